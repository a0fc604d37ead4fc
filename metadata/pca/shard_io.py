"""Reading committed feature shards on Spark executors.

The driver reads only the shards' commit markers (:func:`read_markers`); everything row-sized is read
by tasks through fsspec. The *ids pass* (:func:`ids_pass`) spreads one row per shard over tasks:
each verifies its shard against its marker (sizes and sha256) and yields ``(image_id, shard,
shard_idx, row)`` rows and the featurize rejects, or one error row for a shard that fails
verification. The later passes get their rows sorted by (shard_idx, row); :func:`shard_groups`
regroups a task's rows by shard and reads their features. :func:`features_dataframe` offers the
features themselves as a Spark DataFrame, for interoperability (Spark ML).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.contracts import shards
from imgfeat.metadata.contracts.feature_store import ID_DTYPE, committed_shards, read_feature_shard, read_rejects

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

Markers = dict[str, dict[str, Any]]
"""Commit markers of the committed feature shards, by shard stem (JSON objects, see contracts.shards)."""

_IDS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("shard", pa.string()), ("shard_idx", pa.int32()), ("row", pa.int32()),
        ("kind", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ]
)
_IDS_DDL = "image_id string, shard string, shard_idx int, row int, kind string, reason string, detail string"


def read_markers(features: str) -> Markers:
    """The markers of the committed shards of ``features``; ValueError when there are none, or they disagree."""
    markers = committed_shards(features, verify=False)
    if not markers:
        raise ValueError(f"--features {features}: no committed feature shards (no part-*.done.json markers)")
    dims = {int(m["dim"]) for m in markers.values()}
    if len(dims) > 1:
        raise ValueError(f"--features {features}: shards disagree on the feature dimension: {sorted(dims)}")
    bad = [s for s, m in markers.items() if m.get("format") not in ("npy", "hdf5")]
    if bad:
        raise ValueError(f"--features {features}: shard(s) {', '.join(bad[:5])} have format "
                         f"{markers[bad[0]].get('format')!r}; only npy and hdf5 are read")
    return markers


def shard_order(markers: Markers) -> list[str]:
    """The shard stems in the order that numbers them: ``shard_idx`` i is ``shard_order(markers)[i]``."""
    return sorted(markers)


def _stems_df(spark: SparkSession, stems: list[str], num_partitions: int) -> DataFrame:
    """A DataFrame ``(shard, shard_idx)`` of the stems, spread over at most ``num_partitions`` tasks."""
    rows = [(s, i) for i, s in enumerate(stems)]
    n = max(1, min(len(rows), num_partitions))
    return spark.sparkContext.parallelize(rows, n).toDF("shard string, shard_idx int")


def _read_shard_ids(folder: str, stem: str, marker: dict[str, Any]) -> np.ndarray:
    """Only the ids of one shard (no feature matrix)."""
    fs, _ = fsspec.core.url_to_fs(folder)
    if marker["format"] == "npy":
        path = fsspec.core.url_to_fs(storage.join(folder, shards.IDS_NPY.format(stem=stem)))[1]
        with fs.open(path, "rb") as fh:
            ids = np.load(fh, allow_pickle=False)
    else:
        import h5py

        path = fsspec.core.url_to_fs(storage.join(folder, shards.FEATURES_H5.format(stem=stem)))[1]
        with fs.open(path, "rb") as fh, h5py.File(fh, "r") as h5:
            ids = h5["image_id"][...].astype(ID_DTYPE)
    if ids.shape[0] != marker["rows"]:
        raise shards.ShardVerificationError(f"{storage.join(folder, stem)}: {ids.shape[0]} ids on disk, marker says {marker['rows']}")
    return ids


def _ids_task(folder: str, markers: Markers,
              checksums: bool) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ids pass's task: ``(shard, shard_idx)`` rows -> id, reject and error rows (:data:`_IDS_SCHEMA`)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for stem, idx in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                marker = markers[stem]
                try:
                    shards.verify_shard(folder, stem, marker, checksums=checksums)
                    ids = _read_shard_ids(folder, stem, marker)
                    rejects = read_rejects(folder, stem)
                except shards.ShardVerificationError as exc:
                    yield pa.RecordBatch.from_pylist(
                        [{"image_id": None, "shard": stem, "shard_idx": idx, "row": None, "kind": "error",
                          "reason": "verification", "detail": str(exc)}], schema=_IDS_SCHEMA)
                    continue
                n = ids.shape[0]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(ids.tolist(), pa.string()), pa.array([stem] * n, pa.string()),
                     pa.array(np.full(n, idx, np.int32)), pa.array(np.arange(n, dtype=np.int32)),
                     pa.array(["feature"] * n, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string())],
                    schema=_IDS_SCHEMA)
                if rejects:
                    yield pa.RecordBatch.from_pylist(
                        [{"image_id": r.get("image_id"), "shard": stem, "shard_idx": idx, "row": None, "kind": "reject",
                          "reason": str(r.get("reason") or "unknown"), "detail": str(r.get("detail") or "")} for r in rejects],
                        schema=_IDS_SCHEMA)

    return run


def ids_pass(spark: SparkSession, features: str, markers: Markers, partitions: int) -> tuple[DataFrame, int]:
    """The persisted ids DataFrame and its number of reject rows; raises naming every refused shard.

    Rows: ``image_id, shard, shard_idx, row, kind, reason, detail`` with ``kind`` ``feature`` (one per
    feature row), ``reject`` (a featurize reject, with its reason) or ``error`` (a refused shard).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    stems = shard_order(markers)
    ids = _stems_df(spark, stems, partitions).mapInArrow(_ids_task(features, markers, True), _IDS_DDL)
    ids = ids.persist(StorageLevel.MEMORY_AND_DISK)
    # One job: the error messages (one per refused shard at most) and the reject count.
    row = ids.filter("kind <> 'feature'").agg(
        F.collect_list(F.when(F.col("kind") == "error", F.col("detail"))).alias("errors"),
        F.sum((F.col("kind") == "reject").cast("long")).alias("rejects")).collect()[0]
    if row["errors"]:
        ids.unpersist()
        msgs = sorted(row["errors"])
        raise shards.ShardVerificationError(f"{len(msgs)} feature shard(s) refused: " + "; ".join(msgs))
    return ids, int(row["rejects"] or 0)


def shard_groups(
    batches: Iterator[pa.RecordBatch], folder: str, stems: list[str], markers: Markers
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Group incoming rows (sorted by ``shard_idx``, row; ``stems[shard_idx]`` names the shard) by shard;
    yield (rows, their features [m, d]).

    Each shard is checked against its marker (sizes) and its ids against those the ids pass read.
    """

    def read(shard: int, pending: list[pa.RecordBatch]) -> tuple[pa.Table, np.ndarray]:
        table = pa.Table.from_batches(pending)
        stem = stems[shard]
        marker = markers[stem]
        shards.verify_shard(folder, stem, marker, checksums=False)
        ids, feats = read_feature_shard(folder, stem, marker)
        rows = table.column("row").to_numpy()
        expect = np.asarray(table.column("image_id").to_pylist(), dtype=ID_DTYPE)
        if not np.array_equal(ids[rows], expect):
            raise shards.ShardVerificationError(f"{storage.join(folder, stem)}: ids changed since they were read")
        return table, feats[rows]

    pending: list[pa.RecordBatch] = []
    current = -1
    for batch in batches:
        if batch.num_rows == 0:
            continue
        idx = batch.column(batch.schema.get_field_index("shard_idx")).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(idx)) + 1).tolist(), len(idx)]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            shard = int(idx[start])
            if pending and shard != current:
                yield read(current, pending)
                pending = []
            current = shard
            pending.append(batch.slice(start, stop - start))
    if pending:
        yield read(current, pending)


def features_dataframe(spark: SparkSession, features: str, verify: bool = True,
                       num_partitions: int | None = None) -> DataFrame:
    """All committed feature shards of ``features`` as a DataFrame ``(image_id, shard, row, features array<float>)``.

    Each task verifies and reads its own shards through fsspec. Meant for interoperability (Spark ML);
    the pca stage itself keeps features out of the JVM.
    """
    markers = read_markers(features)
    stems = sorted(markers)
    folder = features
    schema = pa.schema([("image_id", pa.string()), ("shard", pa.string()), ("row", pa.int32()),
                        ("features", pa.list_(pa.float32()))])

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for stem in batch.column(0).to_pylist():
                marker = markers[stem]
                if verify:
                    shards.verify_shard(folder, stem, marker)
                ids, feats = read_feature_shard(folder, stem, marker)
                n, d = feats.shape
                flat = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
                lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), flat)
                for start in range(0, n, 1024):
                    stop = min(n, start + 1024)
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(ids[start:stop].tolist(), pa.string()), pa.array([stem] * (stop - start), pa.string()),
                         pa.array(np.arange(start, stop, dtype=np.int32)), lists.slice(start, stop - start)], schema=schema)

    n = num_partitions or spark.sparkContext.defaultParallelism
    return _stems_df(spark, stems, n).mapInArrow(run, "image_id string, shard string, row int, features array<float>")
