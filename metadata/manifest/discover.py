"""Listing the sources on Spark, breadth-first: one job per folder depth, each folder listed by one task.

Depth 0 is the SRC folders. A job lists the folders of one depth (``listing.list_folder``: one
``scandir`` or one paged delimiter listing each), spread over the tasks, and writes every entry it finds
(files, what cannot be listed, and the subfolders) to ``URL/depth-NNN/``; the subfolders are the next
depth's folders. So every file is listed once by exactly one task, and the listing work of the whole
job grows with files + folders, not with files x tasks (a task holds one folder's page, streamed).
The driver sees folder names only, one depth at a time.

A big flat folder on an object store is split into key ranges (``key_ranges``): a task lists at most
``Paging.split_pages`` pages of it and hands the rest to the next round as ranges, so a flat prefix of 10M
keys is listed by about a hundred tasks, not one.

Cost: one Spark job per round (folder depth, plus a round or two per log10 of a flat folder's size),
each with a small read-back of the folder and range names; LIST requests about files / 1,000 + folders
+ key ranges on an object store.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.metadata.manifest.key_ranges import Paging
from imgfeat.metadata.manifest.listing import Entry, list_folder
from imgfeat.metadata.manifest.row_guard import storable_text
from imgfeat.metadata.spark.parquet import PARQUET_SUFFIX, file_batches, read_parquet_dataset, write_parquet_dataset
from imgfeat.metadata.storage import SUCCESS_FILE, join, staged_file, write_bytes_atomic

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

LISTED_SCHEMA = pa.schema([
    ("root", pa.string()), ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()),
    ("error", pa.string()), ("is_folder", pa.bool_()), ("raw_path", pa.binary()),
    ("after", pa.string()), ("upto", pa.string()),
])
"""One listed entry: a file (size, mtime), a subfolder (``is_folder``), a key range of a folder still to
list (``is_folder`` with ``after``/``upto``, see ``key_ranges``) or what could not be listed (``error``).
A name that is not UTF-8 is stored as text with ``\\xNN`` escapes and, to reach the file, as its bytes
(``raw_path``, else null); its manifest row is then ``bad_path``."""

_BATCH_ROWS = 4096


def listed_row(e: Entry) -> dict[str, Any]:
    """A listed entry as a LISTED_SCHEMA row (the inverse of ``listed_entry``)."""
    text = storable_text(e.path)
    raw = e.path.encode("utf-8", "surrogateescape") if text != e.path else None
    return {"root": e.root, "path": text, "size": e.size, "mtime": e.mtime, "error": e.error,
            "is_folder": e.is_folder, "raw_path": raw, "after": e.after, "upto": e.upto}


def _lister(batches: Iterator[pa.RecordBatch], paging: Paging) -> Iterator[pa.RecordBatch]:
    """The listing task: for each (root, folder, after, upto) row, the entries of that folder (key range)
    as LISTED_SCHEMA batches."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for task in batch.to_pylist():
            folder = task["folder"].decode("utf-8", "surrogateescape")
            for e in list_folder(task["root"], folder, task["after"], task["upto"], paging):
                rows.append(listed_row(e))
                if len(rows) == _BATCH_ROWS:
                    yield pa.RecordBatch.from_pylist(rows, schema=LISTED_SCHEMA)
                    rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=LISTED_SCHEMA)


def list_on_spark(spark: SparkSession, roots: list[str], url: str, tasks: int,
                  paging: Paging = Paging()) -> dict[str, Any]:
    """List every SRC in ``roots`` breadth-first into the Parquet datasets under ``url``.

    A round lists the subfolders and the key ranges (``key_ranges``) the round before found. Returns
    ``{"depths": [dataset URLs, one per round], "entries": rows written, "folders": folders and key
    ranges listed, "ranges": key ranges among them}``."""
    Item = tuple[str, bytes, "str | None", "str | None"]
    frontier: list[Item] = [(r, r.encode("utf-8", "surrogateescape"), None, None) for r in roots]
    depths: list[str] = []
    entries = folders = ranges = 0
    while frontier:
        depth_url = join(url, f"depth-{len(depths):03d}")
        df = (spark.sparkContext.parallelize(frontier, max(1, min(len(frontier), tasks)))
              .toDF("root string, folder binary, after string, upto string"))
        written = write_parquet_dataset(df, depth_url, schema=LISTED_SCHEMA, transform=partial(_lister, paging=paging))
        depths.append(depth_url)
        folders += len(frontier)
        ranges += sum(1 for f in frontier if f[2] is not None or f[3] is not None)
        entries += written["rows"]
        found = (read_parquet_dataset(spark, depth_url, columns=["root", "path", "is_folder", "raw_path", "after", "upto"],
                                      num_partitions=tasks).where("is_folder").drop("is_folder").collect())
        frontier = sorted(((r["root"], bytes(r["raw_path"]) if r["raw_path"] is not None else r["path"].encode(),
                            r["after"], r["upto"]) for r in found), key=lambda f: (f[0], f[1], f[2] or "", f[3] or ""))
        log.info("listing round %d: %d entries, %d folders and key ranges next", len(depths) - 1, written["rows"],
                 len(frontier))
    return {"depths": depths, "entries": entries, "folders": folders, "ranges": ranges}


def write_listing(entries: list[Entry], url: str, files: int) -> dict[str, Any]:
    """``entries`` as a listed dataset of ``files`` Parquet files split by a stable hash of the path, so
    the check job reads them as ``files`` even tasks with no shuffle. Returns what ``list_on_spark`` does."""
    parts: list[list[dict[str, Any]]] = [[] for _ in range(files)]
    for e in entries:
        row = listed_row(e)
        parts[zlib.crc32(row["path"].encode()) % files].append(row)
    names = []
    for i, rows in enumerate(parts):
        rows.sort(key=lambda r: r["path"])  # folder by folder: reads go in disk order
        if rows or i == 0:  # keep the schema readable even when nothing was found
            names.append(f"part-{i:05d}{PARQUET_SUFFIX}")
            with staged_file(join(url, names[-1])) as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=LISTED_SCHEMA), tmp)
    write_bytes_atomic(join(url, SUCCESS_FILE), (json.dumps({"files": names, "rows": len(entries)}) + "\n").encode())
    return {"depths": [url], "entries": len(entries), "folders": None}


def listed_entry(item: dict[str, Any]) -> Entry:
    """A LISTED_SCHEMA row (as a dict) back to the ``Entry`` it was, with the file's real name."""
    raw = item.get("raw_path")
    path = bytes(raw).decode("utf-8", "surrogateescape") if raw is not None else item["path"]
    return Entry(item["root"], path, item["size"], item["mtime"], item["error"])


def listed_batches(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """In a task: batches of listed-file URLs (one column) to the LISTED_SCHEMA batches in those files."""
    for _, batch in file_batches(names, batch_size=_BATCH_ROWS):
        yield batch


def listed_files(spark: SparkSession, listing: dict[str, Any], tasks: int) -> DataFrame:
    """The listed entries that are files or listing errors (not folders), from every depth."""
    frames = [read_parquet_dataset(spark, u, num_partitions=tasks) for u in listing["depths"]]
    df = frames[0]
    for other in frames[1:]:
        df = df.unionByName(other)
    return df.where("NOT is_folder")
