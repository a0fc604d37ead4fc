"""The shard index of a manifest: one row per shard, ``_shards.parquet`` inside the manifest dataset folder.

Featurize decides which shards are still to do, and which manifest files each rank opens, from this
small table instead of the manifest's rows. Columns (:data:`SHARD_INDEX_SCHEMA`):

* ``shard`` (int32): the manifest shard number;
* ``rows`` (int64): its usable rows (status ``ok``);
* ``members`` (string): ``shards.members_digest`` of those rows' image ids (sha256 over the sorted ids),
  the value a committed feature shard's marker carries;
* ``files`` (list<string>): the dataset's data files holding those rows, relative to the dataset folder.

The Parquet schema metadata (key :data:`INDEX_META_KEY`) records the dataset files the index was built
from (relative name -> size); :func:`read_shard_index` returns None when the dataset's files are not
exactly those any more (a stale index is never trusted). The name starts with ``_``, so the manifest
readers (``schema.read_manifest``, ``spark.parquet.dataset_files``) skip it.

:func:`build_shard_index` runs on Spark (tasks read the files, a ``groupBy(shard)`` computes each shard's
count and digest; one task writes the file); pyspark is imported inside it only. The rest is pyarrow.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.contracts import delta
from imgfeat.metadata.contracts.schema import STATUS_OK, manifest_path

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

SHARD_INDEX_FILE = "_shards.parquet"
INDEX_META_KEY = b"imgfeat.shard_index"
INDEX_VERSION = 1
SHARD_INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("members", pa.string(), nullable=False),
        pa.field("files", pa.list_(pa.string())),
    ]
)


def dataset_data_files(dataset: str) -> dict[str, int]:
    """The data files of the Parquet dataset folder ``dataset`` as relative name -> size in bytes.

    The files a pyarrow reader of the folder sees: every file whose path has no part starting with ``_``
    or ``.`` (``read_manifest``'s ``ignore_prefixes``); of a Delta table, its current version's (from the
    log). One listing; no data file is opened."""
    fs, root = fsspec.core.url_to_fs(dataset)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    if delta.is_delta(dataset):
        return delta.data_file_sizes(dataset)
    base = root.rstrip("/") + "/"
    out: dict[str, int] = {}
    for path, info in fs.find(root, detail=True).items():
        if not path.startswith(base) or info.get("type", "file") != "file":
            continue
        rel = path[len(base):]
        if not any(part.startswith(("_", ".")) for part in rel.split("/")):
            out[rel] = int(info.get("size") or 0)
    return dict(sorted(out.items()))


def index_url(dataset: str) -> str:
    """Where the shard index of the dataset folder ``dataset`` lives."""
    return storage.join(dataset, SHARD_INDEX_FILE)


def build_shard_index(spark: SparkSession, dataset: str, num_partitions: int | None = None,
                      key: str = "image_id") -> dict[str, Any]:
    """Build ``_shards.parquet`` for the manifest Parquet dataset folder ``dataset`` (e.g. the manifest
    job's staging folder before it is published as ``OUT/manifest``) and return ``{"url", "shards", "rows"}``.

    Tasks read the ``shard``, ``image_id`` and ``status`` columns of their files; ``groupBy(shard)`` over
    the ok rows gives each shard's row count, members digest (``sha2`` of the sorted ids, each followed by
    a newline: ``shards.members_digest``) and files. One task writes the index (O(shards) rows); the driver
    sees the file listing and one count row. ``key``: the id column whose digest is a shard's members
    (``tile_id`` for the tile table)."""
    from pyspark.sql import functions as F

    files = dataset_data_files(dataset)
    if not files:
        raise ValueError(f"{dataset}: no manifest data files to index")
    from imgfeat.metadata.spark.parquet import files_frame

    names = files_frame(spark, [storage.join(dataset, r) for r in sorted(files)], num_partitions)
    rows = names.mapInArrow(_read_task(dataset, key), "shard int, image_id string, file string")
    ids_sorted = F.array_sort(F.collect_list("image_id"))
    index = rows.groupBy("shard").agg(
        F.count(F.lit(1)).alias("rows"),
        F.sha2(F.concat(F.array_join(ids_sorted, "\n"), F.lit("\n")), 256).alias("members"),
        F.array_sort(F.collect_set("file")).alias("files"),
    )
    # repartition (a shuffle), not coalesce: the aggregation stays spread over tasks; only the O(shards)
    # result meets in the one task that writes the file.
    out = index_url(dataset)
    written = index.repartition(1).mapInArrow(_write_task(out, files), "shards long, rows long").collect()
    shards_n = int(sum(r["shards"] for r in written))
    total = int(sum(r["rows"] for r in written))
    log.info("wrote %s: %d shards, %d ok rows, from %d files", out, shards_n, total, len(files))
    return {"url": out, "shards": shards_n, "rows": total}


def _read_task(dataset: str, key: str = "image_id") -> Any:
    """The index build's read task: file names -> ``(shard, key as image_id, file)`` of the ok rows with a shard."""
    def run(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.compute as pc

        from imgfeat.metadata.spark.parquet import file_batches

        prefix = storage.join(dataset, "")
        schema = pa.schema([("shard", pa.int32()), ("image_id", pa.string()), ("file", pa.string())])
        for url, b in file_batches(names, ["shard", key, "status"], batch_size=65536):
            keep = pc.and_(pc.equal(b.column("status"), STATUS_OK), pc.is_valid(b.column("shard")))
            b = b.filter(pc.fill_null(keep, False))
            if b.num_rows:
                yield pa.RecordBatch.from_arrays(
                    [b.column("shard").cast(pa.int32()), b.column(key).cast(pa.string()),
                     pa.array([url[len(prefix):]] * b.num_rows, pa.string())], schema=schema)

    return run


def _write_task(url: str, files: dict[str, int]) -> Any:
    """The index build's write task: all index rows (one partition) -> ``_shards.parquet``; yields its counts."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.compute as pc

        parts = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
        table = pa.concat_tables(parts) if parts else SHARD_INDEX_SCHEMA.empty_table()
        table = table.select(SHARD_INDEX_SCHEMA.names).cast(SHARD_INDEX_SCHEMA).sort_by("shard")
        write_shard_index(url, table, files)
        yield pa.RecordBatch.from_pylist(
            [{"shards": table.num_rows, "rows": int(pc.sum(table.column("rows")).as_py() or 0)}],
            schema=pa.schema([("shards", pa.int64()), ("rows", pa.int64())]))

    return run


def shard_rows(table: pa.Table) -> pa.Table:
    """``shard, rows, members`` of the ok rows of a manifest ``table`` held in one process (pyarrow): what
    ``build_shard_index`` computes on Spark, for a manifest small enough for one task."""
    import pyarrow.compute as pc

    from imgfeat.metadata.contracts.shards import members_digest

    ok = table.filter(pc.and_(pc.equal(table["status"], STATUS_OK), pc.is_valid(table["shard"])))
    ok = ok.select(["shard", "image_id"]).sort_by([("shard", "ascending")])
    shard_col, ids = ok["shard"].to_pylist(), ok["image_id"].to_pylist()
    out: dict[str, list[Any]] = {"shard": [], "rows": [], "members": []}
    start = 0
    for i in range(1, len(shard_col) + 1):
        if i == len(shard_col) or shard_col[i] != shard_col[start]:
            out["shard"].append(shard_col[start])
            out["rows"].append(i - start)
            out["members"].append(members_digest(ids[start:i]))
            start = i
    return pa.table({"shard": pa.array(out["shard"], pa.int32()), "rows": pa.array(out["rows"], pa.int64()),
                     "members": pa.array(out["members"], pa.string())})


def write_shard_index(url: str, table: pa.Table, files: dict[str, int]) -> None:
    """Write ``table`` (:data:`SHARD_INDEX_SCHEMA`) atomically at ``url``, bound to the dataset ``files``
    (relative name -> size) it describes."""
    import pyarrow.parquet as pq

    meta = {INDEX_META_KEY: json.dumps({"version": INDEX_VERSION, "files": files}, sort_keys=True).encode()}
    table = table.cast(SHARD_INDEX_SCHEMA).replace_schema_metadata(meta)
    with storage.staged_file(url) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_shard_index(out: str) -> pa.Table | None:
    """The shard index of the manifest at ``out`` (the folder holding ``manifest/``), sorted by shard;
    None when there is none, it is unreadable, or the manifest's files are not those it was built from."""
    return read_dataset_shard_index(manifest_path(out))


def read_dataset_shard_index(dataset: str) -> pa.Table | None:
    """The shard index of the dataset folder ``dataset`` (a manifest or a tile table), as :func:`read_shard_index`."""
    import pyarrow.parquet as pq

    url = index_url(dataset)
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable (%s); ignoring the shard index", url, exc)
        return None
    raw = (table.schema.metadata or {}).get(INDEX_META_KEY)
    try:
        meta = json.loads(raw.decode()) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = {}
    if meta.get("version") != INDEX_VERSION or not set(SHARD_INDEX_SCHEMA.names) <= set(table.column_names):
        log.warning("%s: not a shard index of version %d; ignoring it", url, INDEX_VERSION)
        return None
    built_from = {str(k): int(v) for k, v in dict(meta.get("files", {})).items()}
    if built_from != dataset_data_files(dataset):
        log.warning("%s: the manifest's files changed since the shard index was built; ignoring it", url)
        return None
    return table.select(SHARD_INDEX_SCHEMA.names).sort_by("shard")
