"""The manifest job on Spark: list, check every file in executor tasks, then organize and write.

1. list (``manifest.discover``): breadth-first over folders, one Spark job per depth, each folder
   listed by one task; every entry goes to Parquet in a work folder, the driver sees folder names.
2. check: the listed files, joined by path to the previous manifest on an incremental run (a Spark
   join: no task reads the whole previous manifest), are shuffled over the tasks by path. Each task
   reads each of its files once (sha256, header sniff, optional decode), labels it and writes its
   rows as Parquet; only file names and row counts come back. Unchanged files keep their row unread.
3. organize: duplicates, splits and shards (``manifest.organize``). Up to ``ONE_TASK_ROWS`` rows one
   task does it with pyarrow and writes the manifest as one file; above, Spark's shuffles and sorts
   (``manifest.organize_spark``: the same manifest, no task holds more than its share). Either way the
   manifest is clustered by shard, and the shard index (``contracts.shard_index``) is written beside it.
   With ``near_duplicates`` on, the quality and near-duplicate summaries (``manifest.data_quality``) run
   in that one task too, before it organizes; above the limit, on Spark before organize.

The driver sees SRC names, folder names, file names of the work datasets, label names and counts.
Every file found is exactly one row.
"""
from __future__ import annotations

import logging
import operator
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.metadata.config import Config, ManifestConfig, dump_toml
from imgfeat.metadata.contracts.schema import CONFIG_FILE, MANIFEST_SCHEMA, SIGNAL_COLUMNS, SUMMARY_FILE, manifest_path
from imgfeat.metadata.contracts.shard_index import (
    build_shard_index,
    dataset_data_files,
    index_url,
    shard_rows,
    write_shard_index,
)
from imgfeat.metadata.contracts.tiles import tiles_path
from imgfeat.metadata.manifest import labels as labels_mod
from imgfeat.metadata.manifest import organize as org
from imgfeat.metadata.manifest.checks import check_entry, prefetched
from imgfeat.metadata.manifest.data_quality import (
    near_duplicate_summary,
    near_duplicate_summary_table,
    originals,
    quality_summary,
    quality_summary_table,
)
from imgfeat.metadata.manifest.discover import (
    list_on_spark,
    listed_batches,
    listed_entry,
    listed_files,
    write_listing,
)
from imgfeat.metadata.manifest.listing import Entry, check_out_outside_sources, check_source
from imgfeat.metadata.manifest.organize_spark import ROW_GROUP_ROWS, organize_on_spark
from imgfeat.metadata.manifest.row_guard import failed_row, to_record_batch
from imgfeat.metadata.manifest.store import (
    current_version,
    labels_digest,
    previous_manifest,
    publish_manifest,
    same_rows,
    staging_url,
    walk_small_local,
)
from imgfeat.metadata.manifest.tiles_table import write_tile_table
from imgfeat.metadata.spark.parquet import dataset_files, files_frame, read_parquet_dataset, write_parquet_dataset
from imgfeat.metadata.spark.session import get_spark, num_tasks
from imgfeat.metadata.storage import (
    check_writable,
    is_local,
    join,
    read_json,
    read_json_required,
    remove_folder,
    staged_file,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

CHECKED_SCHEMA = pa.schema(
    [f for f in MANIFEST_SCHEMA if f.name not in org.PLANNED_COLUMNS]
    + [pa.field("folder_split", pa.string()), pa.field("_kept", pa.bool_()), pa.field("_pshard", pa.int32()),
       pa.field("_prev", pa.bool_())]
)
"""A checked row: the manifest row before duplicates, splits and shards, with what organizing needs
(``_kept``: unchanged since the previous manifest; ``_pshard``: its previous shard; ``_prev``: its path
was in the previous manifest)."""

ONE_TASK_ROWS = 500_000
"""Up to this many rows one task organizes and writes the whole manifest (one Parquet file)."""

_BATCH_ROWS = 4096
_ORGANIZED = "organized.json"
_QUALITY_COLUMNS = ["path", "image_id", "status", "content_hash", *SIGNAL_COLUMNS]
_INDEX_ROWS = "index_rows.parquet"


def _labeller(mc: ManifestConfig) -> Callable[[dict[str, Any]], None]:
    """Sets ``label`` on a row and turns an ``ok`` row with a bad or missing label into ``bad_label``."""
    mode = mc.label_from
    pattern = re.compile(mc.label_regex if mode == "regex" else "")
    csv_url = mc.labels_csv
    csv_maps: list[dict[str, str]] = []  # filled in the task on first use: by URI, by relative path
    problems: dict[str, str | None] = {}

    def apply(row: dict[str, Any]) -> None:
        rel = row["rel_path"]
        missing = None
        if mode == "parent":
            label = labels_mod.parent_label(rel)
        elif mode == "regex":
            label = labels_mod.regex_label(rel, pattern)
            missing = f"label_regex does not match {rel!r}"
        else:
            if not csv_maps:
                csv_maps.extend(_load_labels_csv(csv_url))
            label = csv_maps[0].get(row["path"])
            if label is None:
                label = csv_maps[1].get(rel)
            missing = "file is not listed in manifest.labels_csv"
        row["label"] = label
        if label is None:
            problem = missing
        elif label in problems:
            problem = problems[label]
        else:  # a few labels repeat over many files
            problem = problems[label] = labels_mod.label_problem(label)
        if problem and row["status"] == "ok":
            row["status"], row["status_detail"] = "bad_label", problem

    return apply


def _make_checker(cfg: Config) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The check task: listed entries (``discover.LISTED_SCHEMA`` plus ``prev``, the previous manifest's
    row of the same path or None) to checked rows. An unchanged file (same size and mtime) keeps its
    previous row without being read."""
    mc, dc = cfg.manifest, cfg.decode
    validation, max_bytes, max_pixels, formats = mc.validation, dc.max_bytes, dc.max_pixels, tuple(dc.formats)
    max_scans, split_from_folders = dc.max_jpeg_scans, mc.split_from_folders
    signals = mc.near_duplicates != "off"
    tiling = cfg.tiles if cfg.tiles.enabled else None
    label = _labeller(mc)
    names = CHECKED_SCHEMA.names
    as_tuple = operator.itemgetter(*names)
    folder_splits: dict[str, str | None] = {}

    def folder_split(rel: str) -> str | None:
        folder = rel.rpartition("/")[0]
        if folder not in folder_splits:
            folder_splits[folder] = labels_mod.folder_split(rel)
        return folder_splits[folder]

    def rows_of(listed: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        prev: dict[str, dict[str, Any]] = {}
        kept: list[dict[str, Any]] = []

        def fresh() -> Iterator[Entry]:
            for item in listed:
                e = listed_entry(item)
                p = item.get("prev")
                # Unchanged: the same size and mtime, or (a link) still unlistable for the same reason.
                if p is not None and (p["size_bytes"] == e.size and p["mtime"] == e.mtime if e.error is None
                                      else p["status"] == "unreadable" and p["status_detail"] == e.error):
                    row = _kept_row(p)
                    label(row)  # labels from a CSV may have changed since
                    kept.append(row)
                    continue
                if p is not None:
                    prev[e.path] = p
                yield e

        for entry, data in prefetched(fresh(), max_bytes):
            try:  # one file's failure of any kind is that file's row, never the task's
                row = check_entry(entry, validation, max_bytes, max_pixels, formats, data, max_scans, signals,
                                  tiling)
                label(row)
                row["folder_split"] = folder_split(row["rel_path"]) if split_from_folders else None
            except Exception as exc:
                row = dict(failed_row(entry, exc), folder_split=None)
            p = prev.pop(row["path"], None)
            row["_kept"], row["_prev"] = False, p is not None
            # Only the same bytes keep the previous shard: a file changed in place (even at the same size)
            # leaves it, so that feature shard's members change and it is recomputed.
            same_file = (p is not None and p["status"] == "ok" and row["status"] == "ok"
                         and p["content_hash"] == row.get("content_hash"))
            row["_pshard"] = p["shard"] if p is not None and same_file else None
            yield row
            while kept:
                yield kept.pop()
        while kept:
            yield kept.pop()

    def to_batch(rows: list[tuple]) -> pa.RecordBatch:
        return to_record_batch(rows, CHECKED_SCHEMA)

    def check(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows: list[tuple] = []
        listed = (item for batch in batches for item in batch.to_pylist())
        for row in rows_of(listed):
            rows.append(as_tuple(row))
            if len(rows) == _BATCH_ROWS:
                yield to_batch(rows)
                rows = []
        if rows:
            yield to_batch(rows)

    return check


def _kept_row(p: dict[str, Any]) -> dict[str, Any]:
    """The checked row of an unchanged file, from its previous manifest row.

    It keeps its split (stable splits for unchanged files); a duplicate goes back to ``ok`` so that
    duplicates are found again over the new set of files."""
    row = {n: p.get(n) for n in CHECKED_SCHEMA.names}
    row.update(folder_split=p["split"], _kept=True, _prev=True,
               _pshard=p["shard"] if p["status"] == "ok" else None)
    if p["status"] in ("duplicate", "near_duplicate"):
        row.update(status="ok", status_detail="")
    return row


def _read_parts(files: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    tables = []
    for url in files:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return tables


def _make_organizer(cfg: Config, files: list[str], work: str, previous: str | None, previous_rows: int):
    """The organize task (one, up to ``ONE_TASK_ROWS`` rows): the data-quality summaries and the
    near-duplicate map when ``near_duplicates`` is on (``data_quality``'s one-task forms), then duplicates,
    splits, shards and counts over all checked rows; yields the whole manifest sorted by (shard, path),
    rows without a shard last, so a featurize rank's shard filter skips the other row groups. The counts
    (with ``quality`` and ``near_duplicates``) go to ``work/organized.json`` and the shard index rows to
    ``work/index_rows.parquet``."""
    mc = cfg.manifest
    ratios, seed, per_shard = dict(mc.split_ratios), mc.split_seed, mc.rows_per_shard
    drop = mc.near_duplicates == "drop"
    signals = mc.near_duplicates != "off"
    distance, max_pairs = mc.near_duplicate_distance, mc.near_duplicate_max_pairs

    def organize(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        base = 0
        if previous is not None:
            top = pc.max(pa.concat_tables(_read_parts(dataset_files(previous), ["shard"]))["shard"]).as_py()
            base = 0 if top is None else top + 1
        parts = _read_parts(files)
        quality = near_summary = near = seconds = None
        if signals:
            t0 = time.perf_counter()
            checked = pa.concat_tables([p.select(_QUALITY_COLUMNS) for p in parts])
            found = quality_summary_table(checked)
            quality = found if found["rows"] else None
            near_summary, near = near_duplicate_summary_table(checked, distance, max_pairs)
            del checked
            seconds = time.perf_counter() - t0
        plans, counts = org.organize(parts, ratios, seed, per_shard, base, previous_rows, near, drop)
        counts.update(quality=quality, near_duplicates=near_summary, quality_s=seconds)
        write_json_atomic(join(work, _ORGANIZED), counts)
        names = counts["label_names"]
        table = pa.concat_tables([org.finish(t, p, names, MANIFEST_SCHEMA) for t, p in zip(parts, plans)])
        with staged_file(join(work, _INDEX_ROWS)) as tmp:
            pq.write_table(shard_rows(table), tmp)
        table = table.sort_by([("shard", "ascending", "at_end"), ("path", "ascending", "at_end")])
        yield from table.to_batches(max_chunksize=ROW_GROUP_ROWS)

    return organize


def _remove_run_folders(*folders: str) -> None:
    """Remove the run's work folders; while the job's own error propagates, a folder that cannot be
    removed is logged rather than raised over that error."""
    failing = sys.exc_info()[0] is not None
    for folder in folders:
        try:
            remove_folder(folder)
        except OSError as exc:
            if not failing:
                raise
            log.warning("could not remove %s after the failure below: %s", folder, exc)


def run_manifest(cfg: Config, sources: list[str], out: str, master: str | None = None,
                 incremental: bool = False) -> dict[str, Any]:
    """Build the manifest of ``sources`` under ``out``; return the summary (also written as JSON)."""
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
    check_out_outside_sources(out, roots)
    check_writable(out, "--out")
    if cfg.manifest.label_from == "csv":
        _check_labels_csv(cfg.manifest.labels_csv)
    if cfg.manifest.table_format == "delta" and not is_local(out):
        raise ValueError(f"manifest.table_format = 'delta': --out {out} is not a local folder (Delta manifests are "
                         "written to local folders in this release; use table_format = 'parquet' on object stores)")
    labels_sha = labels_digest(cfg.manifest.labels_csv) if cfg.manifest.label_from == "csv" else None
    # Before the check job: a file changed while it runs changes the next listing.
    small = walk_small_local(roots)
    listing = small[1] if small is not None else None
    if incremental and listing is not None:
        kept = _kept_summary(cfg, out, roots, listing, labels_sha, t0)
        if kept is not None:
            return kept
    if cfg.manifest.validation == "header" and cfg.manifest.near_duplicates != "off":
        log.info("manifest: header validation with near_duplicates = %r decodes every image for its hash and "
                 "signals; set manifest.near_duplicates = 'off' for a header-only check", cfg.manifest.near_duplicates)
    spark = get_spark(cfg.spark, master)
    timings["spark_start_s"] = time.perf_counter() - t0
    previous, previous_rows = previous_manifest(out, cfg.fingerprint("manifest")) if incremental else (None, 0)
    slices = num_tasks(spark, cfg.spark)
    timings["plan_s"] = time.perf_counter() - t0 - timings["spark_start_s"]

    work, staging = staging_url(out, "work"), staging_url(out)
    try:
        t1 = time.perf_counter()
        listed_url = join(work, "listed")
        listing_info = (write_listing(small[0], listed_url, slices) if small is not None
                        else list_on_spark(spark, roots, listed_url, slices))
        timings["list_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        checker = _make_checker(cfg)
        if small is not None and previous is None:
            # The driver split the files evenly over `slices` listed files: a task checks one, no shuffle.
            names = dataset_files(listed_url)
            entries = files_frame(spark, names, len(names))
            checked = write_parquet_dataset(entries, join(work, "checked"), schema=CHECKED_SCHEMA,
                                            transform=lambda batches: checker(listed_batches(batches)))
        else:
            entries = listed_files(spark, listing_info, slices)
            if previous is not None:
                before = read_parquet_dataset(spark, previous, num_partitions=slices)
                entries = entries.join(before.select("path", F.struct(*before.columns).alias("prev")), "path", "left")
            # The shuffle spreads the files over the tasks evenly, whatever folder listed them.
            entries = entries.repartition(slices, "path").sortWithinPartitions("path")
            checked = write_parquet_dataset(entries, join(work, "checked"), schema=CHECKED_SCHEMA, transform=checker)
        files = [join(work, "checked/" + f) for f in checked["files"]]
        timings["check_s"] = time.perf_counter() - t1

        one_task = checked["rows"] <= ONE_TASK_ROWS
        if one_task:  # the organize task computes the data-quality summaries too: no Spark job of their own
            t2 = time.perf_counter()
            organizer = _make_organizer(cfg, files, work, previous, previous_rows)
            write_parquet_dataset(spark.range(0, 1, 1, 1), staging, schema=MANIFEST_SCHEMA, transform=organizer)
            counts = read_json_required(join(work, _ORGANIZED))
            quality, near, seconds = counts.pop("quality"), counts.pop("near_duplicates"), counts.pop("quality_s")
            timings["organize_s"] = time.perf_counter() - t2
            if seconds is not None:  # the task's data-quality part, counted as on the Spark path
                timings["quality_s"] = seconds
                timings["organize_s"] -= seconds
        else:
            t2 = time.perf_counter()
            quality, near, near_map = _data_quality(spark, cfg, join(work, "checked"), join(work, "near"), slices)
            timings["quality_s"] = time.perf_counter() - t2
            t2 = time.perf_counter()
            counts = organize_on_spark(spark, files, staging, cfg, previous, previous_rows, partitions=slices,
                                       near=near_map)
            timings["organize_s"] = time.perf_counter() - t2
        _log_near_duplicates(near)

        t3 = time.perf_counter()
        published = previous is None or not _same_as_previous(spark, out, previous, staging, join(work, "checked"), counts,
                                                                labels_sha)
        if published:  # the shard index: featurize ranks read their own shards' rows by it
            if one_task:  # the organize task computed it; the driver adds the one file name (O(shards) rows)
                rows = _read_parts([join(work, _INDEX_ROWS)])[0]
                data = dataset_data_files(staging)
                names = pa.array([sorted(data)] * rows.num_rows, pa.list_(pa.string()))
                write_shard_index(index_url(staging), rows.append_column("files", names), data)
            else:
                build_shard_index(spark, staging, slices)
            version = publish_manifest(out, staging, keep_history=incremental, table_format=cfg.manifest.table_format,
                                       note={"total": counts["total"], "incremental": counts["incremental"]})
        else:  # a new version would only make the later stages redo their work on the same rows
            version = current_version(out)
            log.info("manifest: no file added, changed or removed; version %d kept", version)
        timings["write_s"] = time.perf_counter() - t3
        tiles = _tile_table(spark, cfg, out, slices, published)
    finally:
        _remove_run_folders(work, staging)
    timings["total_s"] = time.perf_counter() - t0

    total = counts["total"]
    changes = counts["incremental"] if previous is not None else None
    keys = ("by_status", "by_label", "by_split", "by_label_split", "example_by_status", "total_bytes", "labels",
            "shard_rows", "shard_bytes")
    summary = {
        "version": version,
        "sources": roots,
        "total": total,
        **{k: counts[k] for k in keys},
        "num_shards": counts["num_shards"],
        "validation": cfg.manifest.validation,
        "fingerprint": cfg.fingerprint("manifest"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "files_per_s": round(total / timings["total_s"], 1) if timings["total_s"] else None,
        "incremental": changes,
        "published": published,
        "labels_csv_sha256": labels_sha,
        "quality": quality,
        "near_duplicates": dict(near, **counts["leakage"]) if near else None,
        "label_conflicts": counts["label_conflicts"],
        "listing_digest": listing,
        "table_format": cfg.manifest.table_format,
        "tiles": tiles,
        "master": spark.sparkContext.master,
    }
    write_json_atomic(join(out, SUMMARY_FILE), summary)
    write_bytes_atomic(join(out, CONFIG_FILE), dump_toml(cfg).encode())
    log.info("manifest v%d: %d files, %d ok, %d shards in %.1fs -> %s", version, total,
             counts["by_status"].get("ok", 0), counts["num_shards"], timings["total_s"], out)
    return summary


def _tile_table(spark: SparkSession, cfg: Config, out: str, partitions: int, published: bool) -> dict[str, Any] | None:
    """``OUT/tiles/`` for a new manifest version when tiling is on (the summary's ``tiles`` counts); the
    previous one's counts when the version was kept; none (and no folder) when tiling is off."""
    if not cfg.tiles.enabled:
        remove_folder(tiles_path(out))
        return None
    if not published:
        return (read_json(join(out, SUMMARY_FILE)) or {}).get("tiles")
    return write_tile_table(spark, manifest_path(out), out, cfg.tiles, cfg.manifest.rows_per_shard, partitions)


def _data_quality(spark: SparkSession, cfg: Config, checked: str, scratch: str,
                  tasks: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The summary's ``quality`` and ``near_duplicates`` (``data_quality``) and the URL of the near-duplicate
    map for organize; None where not computed (``near_duplicates = "off"``: no signals)."""
    if cfg.manifest.near_duplicates == "off":
        return None, None, None
    frame = read_parquet_dataset(spark, checked, columns=["path", "image_id", "status", "label", "content_hash",
                                                          *SIGNAL_COLUMNS], num_partitions=tasks)
    firsts = originals(frame, scratch)
    found = quality_summary(firsts)
    quality = found if found["rows"] else None
    near, near_map = near_duplicate_summary(spark, firsts, cfg.manifest.near_duplicate_distance, scratch,
                                            cfg.manifest.near_duplicate_max_pairs)
    return quality, near, near_map


def _log_near_duplicates(near: dict[str, Any] | None) -> None:
    """Log the near-duplicate search's outcome (on the driver, whichever path computed it)."""
    if near is None:
        return
    if near["distance"] < near["requested_distance"]:
        log.warning("near duplicates: distance %d would make more than manifest.near_duplicate_max_pairs "
                    "candidate pairs; searched at distance %d (%s pairs)", near["requested_distance"],
                    near["distance"], near["candidate_pairs"])
    if near["groups"]:
        log.info("manifest: %d near-duplicate groups (%d files)", near["groups"], near["members"])


def _kept_summary(cfg: Config, out: str, roots: list[str], listing: str, labels_sha: str | None,
                  t0: float) -> dict[str, Any] | None:
    """The previous summary, rewritten as this run's, when the sources list exactly as they did before the
    previous run (paths, sizes, mtimes, listing errors), with the same config and labels CSV: the check job
    would keep every row, so it does not start (no Spark at all). None otherwise."""
    prev = read_json(join(out, SUMMARY_FILE))
    if (not prev or prev.get("listing_digest") != listing or prev.get("fingerprint") != cfg.fingerprint("manifest")
            or prev.get("labels_csv_sha256") != labels_sha or prev.get("sources") != roots):
        return None
    seconds = time.perf_counter() - t0
    summary = dict(prev, incremental={"unchanged": prev["total"], "new": 0, "changed": 0, "removed": 0},
                   published=False, timings={"list_s": round(seconds, 3), "total_s": round(seconds, 3)},
                   files_per_s=round(prev["total"] / seconds, 1) if seconds else None)
    write_json_atomic(join(out, SUMMARY_FILE), summary)
    write_bytes_atomic(join(out, CONFIG_FILE), dump_toml(cfg).encode())
    log.info("manifest: the %d files list as before (%.1fs); version %d kept, nothing checked", prev["total"],
             seconds, prev["version"])
    return summary


def _same_as_previous(spark: SparkSession, out: str, previous: str, staging: str, checked: str,
                      counts: dict[str, Any], labels_sha: str | None) -> bool:
    """Whether the staged manifest has exactly the previous manifest's rows (an incremental run).

    Free in the common case (the counts say every file was kept, same labels CSV). Files that were
    checked again without a change of outcome (an unreadable file has no size or mtime to compare)
    are compared row by row with their previous rows, on Spark (``store.same_rows``)."""
    changes = counts["incremental"]
    if changes["new"] or changes["removed"]:
        return False
    if (read_json(join(out, SUMMARY_FILE)) or {}).get("labels_csv_sha256") != labels_sha:
        return False
    if not changes["changed"]:
        return True
    from pyspark.sql import functions as F

    rechecked = read_parquet_dataset(spark, checked, columns=["path", "_kept"]).where(~F.col("_kept")).select("path")
    return same_rows(spark, previous, staging, rechecked)


def _check_labels_csv(url: str) -> None:
    """Fail fast, naming the key, when the labels CSV is missing or has no ``path,label`` header."""
    import csv
    import io

    try:
        with fsspec.open(url, "rb") as fh:
            fields = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", newline="")).fieldnames
    except FileNotFoundError:
        raise ValueError(f"manifest.labels_csv: no such file {url!r}") from None
    if not fields or not {"path", "label"} <= set(fields):
        raise ValueError(f"manifest.labels_csv {url}: needs a header with columns path,label")


def _load_labels_csv(url: str) -> tuple[dict[str, str], dict[str, str]]:
    """The labels CSV as (label by full URI, label by path relative to SRC); the first row of a path wins."""
    import csv
    import io

    from imgfeat.metadata.contracts.schema import normalize_uri

    by_uri: dict[str, str] = {}
    by_rel: dict[str, str] = {}
    with fsspec.open(url, "rb") as fh:
        for row in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", newline="")):
            key = row["path"]
            target = by_uri if "://" in key else by_rel
            target.setdefault(normalize_uri(key) if "://" in key else key, row["label"])
    return by_uri, by_rel
