"""Parquet datasets read and written by Spark tasks through fsspec (no Hadoop filesystem involved).

Spark never opens object-store paths itself here: the driver lists file *names* and hands them to
tasks, and each task reads or writes its own files with pyarrow over fsspec. That makes ``s3://``,
``gs://``, ``memory://`` and local paths work the same way, with no hadoop-aws jars.

Writing (``write_parquet_dataset``): each task writes its partition to a hidden temporary name and
commits it as ``part-NNNNN-<uuid>.parquet`` (local: rename; object store: one PUT of the finished
file). The driver collects the committed names (one per partition, from the successful attempt
only), removes whatever else is there (files of failed, retried or speculative attempts) and writes
``_SUCCESS`` last. Readers that only trust ``_SUCCESS`` datasets see all or nothing.

Used by the manifest job and the pca stage.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.metadata import storage
from imgfeat.metadata.contracts import delta
from imgfeat.metadata.storage import SUCCESS_FILE

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"


def _spark_to_arrow(schema: Any) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema)


def _arrow_to_spark(schema: pa.Schema) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Select and cast ``batch``'s columns to ``schema`` (large/regular strings, list flavours)."""
    arrays = []
    for fld in schema:
        col = batch.column(batch.schema.get_field_index(fld.name))
        if not col.type.equals(fld.type):
            col = col.cast(fld.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def dataset_files(url: str) -> list[str]:
    """The committed data files of the Parquet dataset at ``url`` (full URLs, sorted; of a Delta table: its
    current version's)."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise ValueError(f"{url}: no such Parquet dataset")
    if not fs.isdir(root):
        return [url]
    if delta.is_delta(url):  # the folder holds every version's files: the log says which are current
        return delta.current_files(url)
    base = root.rstrip("/") + "/"
    rels = sorted(p[len(base):] for p in fs.find(root) if p.startswith(base))
    return [storage.join(url, r) for r in rels
            if r.endswith(PARQUET_SUFFIX) and not any(part.startswith(("_", ".")) for part in r.split("/"))]


def _prune(url: str, keep: set[str]) -> list[str]:
    """Remove every entry of ``url`` that is not in ``keep``; return the removed names."""
    fs, root = fsspec.core.url_to_fs(url)
    removed: list[str] = []
    if not fs.exists(root):
        return removed
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep:
            fs.rm(entry, recursive=True)
            removed.append(name)
    return removed


def write_parquet_dataset(
    df: DataFrame,
    url: str,
    schema: pa.Schema | None = None,
    overwrite: bool = True,
    compression: str = "zstd",
    transform: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]] | None = None,
) -> dict[str, Any]:
    """Write Spark DataFrame ``df`` as a Parquet dataset at ``url`` from the executors.

    ``schema`` (Arrow) fixes the file schema (columns are selected and cast to it); default: the
    DataFrame's own schema. ``transform``, when given, maps each task's input batches to the
    batches written (in the writing task itself: its output never passes through the JVM); then
    ``schema`` is required. Returns ``{"url", "files", "rows"}``. Only file names and row counts
    reach the driver.
    """
    if transform is not None and schema is None:
        raise ValueError("write_parquet_dataset: a transform needs the output schema")
    schema = schema if schema is not None else _spark_to_arrow(df.schema)
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        if not overwrite and fs.ls(root, detail=False):
            raise ValueError(f"{url}: exists and is not empty (pass overwrite=True)")
        # Drop _SUCCESS first, so a reader never trusts a half-replaced dataset.
        success = fsspec.core.url_to_fs(storage.join(url, SUCCESS_FILE))[1]
        if fs.exists(success):
            fs.rm(success)
        _prune(url, keep=set())
    fs.makedirs(root, exist_ok=True)
    writer = _partition_writer(url, schema, compression, transform)
    started = time.perf_counter()
    committed = df.mapInArrow(writer, "partition long, attempt long, file string, rows long").collect()
    files = sorted({r["file"] for r in committed if r["file"]})
    rows = int(sum(r["rows"] for r in committed))
    if not files:  # keep the schema readable even for an empty result
        name = f"part-00000-{uuid.uuid4().hex}{PARQUET_SUFFIX}"
        with storage.staged_file(storage.join(url, name)) as tmp:
            pq.write_table(schema.empty_table(), tmp, compression=compression)
        files = [name]
    removed = _prune(url, keep=set(files))
    if removed:
        log.info("%s: removed %d leftover file(s) of failed or duplicate task attempts", url, len(removed))
    storage.write_bytes_atomic(
        storage.join(url, SUCCESS_FILE),
        (json.dumps({"files": files, "rows": rows, "committed_at": time.time()}) + "\n").encode(),
    )
    log.info("wrote %s: %d rows in %d files (%.1f s)", url, rows, len(files), time.perf_counter() - started)
    return {"url": url, "files": files, "rows": rows}


def _partition_writer(
    url: str, schema: pa.Schema, compression: str,
    transform: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]] | None = None,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if transform is not None:
            batches = transform(batches)
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx else 0
        attempt = ctx.attemptNumber() if ctx else 0
        name = f"part-{part:05d}-{uuid.uuid4().hex}{PARQUET_SUFFIX}"
        rows = 0
        with storage.staged_file(storage.join(url, name)) as tmp:
            pw: pq.ParquetWriter | None = None
            try:
                for batch in batches:
                    if batch.num_rows == 0:
                        continue
                    if pw is None:
                        pw = pq.ParquetWriter(tmp, schema, compression=compression)
                    pw.write_batch(conform_batch(batch, schema))
                    rows += batch.num_rows
            finally:
                if pw is not None:
                    pw.close()
            if rows == 0:  # nothing to commit: leave an empty temporary for staged_file to discard
                raise _Empty
        yield pa.RecordBatch.from_pylist(
            [{"partition": part, "attempt": attempt, "file": name, "rows": rows}],
            schema=pa.schema([("partition", pa.int64()), ("attempt", pa.int64()), ("file", pa.string()), ("rows", pa.int64())]),
        )

    def guarded(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            yield from write(batches)
        except _Empty:
            return

    return guarded


class _Empty(Exception):
    """An empty partition: no file is committed."""


def files_frame(spark: SparkSession, files: list[str], partitions: int | None = None) -> DataFrame:
    """A one-column DataFrame (``file string``) of ``files``, spread over at most ``partitions`` tasks
    (default: the default parallelism): the input of a task that reads those files itself."""
    n = max(1, min(len(files), partitions or spark.sparkContext.defaultParallelism))
    return spark.sparkContext.parallelize([(f,) for f in files], n).toDF("file string")


def file_batches(names: Iterator[pa.RecordBatch], columns: list[str] | None = None,
                 batch_size: int = 8192) -> Iterator[tuple[str, pa.RecordBatch]]:
    """In a task: for each file URL in the (one-column) input batches, ``(url, batch)`` of its Parquet
    batches, read with pyarrow over fsspec."""
    for names_batch in names:
        for url in names_batch.column(0).to_pylist():
            fs, path = fsspec.core.url_to_fs(url)
            with fs.open(path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns):
                    yield url, batch


def read_parquet_dataset(
    spark: SparkSession,
    url: str,
    columns: list[str] | None = None,
    num_partitions: int | None = None,
) -> DataFrame:
    """A Spark DataFrame over the Parquet dataset at ``url``, read by tasks with pyarrow over fsspec.

    The driver reads only the listing and the first file's footer (for the schema).
    """
    files = dataset_files(url)
    if not files:
        raise ValueError(f"{url}: no Parquet files")
    fs, first = fsspec.core.url_to_fs(files[0])
    with fs.open(first, "rb") as fh:
        schema = pq.read_schema(fh)
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ValueError(f"{url}: no column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
        schema = pa.schema([schema.field(c) for c in columns])
    # Spark wants plain types for the declared schema; tasks cast each batch to it.
    spark_schema = _arrow_to_spark(schema)
    arrow_schema = _spark_to_arrow(spark_schema)
    cols = list(schema.names)

    def read(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _, batch in file_batches(names, cols):
            yield conform_batch(batch, arrow_schema)

    return files_frame(spark, files, num_partitions).mapInArrow(read, spark_schema)
