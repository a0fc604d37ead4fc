"""Join-back and PCA on Spark: feature shards + manifest -> ``RED/reduced/`` Parquet, model, summary, plots.

How the work is split (nothing row-sized ever reaches the driver):

1. *Ids pass*: a DataFrame of shard stems (one row per committed shard) is spread over tasks; each
   task verifies its shard against its marker (sizes and sha256), reads only the ids and the
   featurize rejects, and yields ``(image_id, shard, row)`` rows. A shard that fails verification
   becomes an error row; the driver raises :class:`ShardVerificationError` naming the files.
2. *Join*: Spark joins those ids with the manifest (read by tasks through fsspec) on ``image_id``
   (full outer) and counts matched rows, manifest rows without features (by reason), feature rows
   without a manifest row and ids present in several shards. Only small counts are collected.
3. *Fit*: the matched rows, range-partitioned by shard (one partition per core: shards are
   equal-sized, and each Python task costs about 0.1 s of fixed overhead), sorted by row and cached
   (the projection reads them too), go for the fit split to ``mapInArrow`` tasks that open their
   shards through fsspec, pick the rows and fold them into float64 sums around one common shift
   (the mean of the first shard's first rows, read by the driver). Each task writes its sums (the
   upper blocks of a d x d matrix) to its own file in a scratch folder under OUT and returns the
   name; the driver adds them up one file at a time (plain addition: the shift is shared) and runs
   one ``eigh``.
4. *Transform and write*: the tasks that write the Parquet files (``write_parquet_dataset`` with a
   ``transform``) project their rows with the model themselves, into a scratch folder; only the
   complete dataset replaces ``RED/reduced/``, so a failed run leaves the previous output as it was.

The features themselves never pass through the JVM: at 2048 floats a row, Arrow <-> JVM row
conversion would cost more than the whole PCA (see FACTS: about 0.2 ms of CPU per row).
``features_dataframe`` gives the features as a Spark DataFrame for those who want one (the Spark ML
baseline of ``bench/bench_pca.py`` uses it).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts import shards
from imgfeat.metadata.contracts.feature_store import ID_DTYPE, committed_shards, read_feature_head, read_feature_shard, read_rejects
from imgfeat.metadata.contracts.schema import CONFIG_FILE, manifest_path
from imgfeat.metadata.pca.fit import (
    CovProduct,
    Moments,
    PcaModel,
    dump_accumulator,
    fit_exact,
    fit_randomized,
    load_accumulator,
    merge_moments,
    merge_products,
)
from imgfeat.metadata.spark.parquet import conform_batch, read_parquet_dataset, write_parquet_dataset

log = logging.getLogger(__name__)

REDUCED_DIR = "reduced"
MODEL_FILE = "pca_model.npz"
PCA_SUMMARY = "pca_summary.json"
APPLY_SUMMARY = "pca_apply_summary.json"
VARIANCE_PLOT = "pca_explained_variance.png"
SCATTER_PLOT = "pca_scatter.png"
WIDE_DIM = 8192
"""With ``method="auto"``, features wider than this use the randomized method."""
SCATTER_POINTS = 20_000
SCRATCH_PREFIX = "_pca_scratch-"
MANIFEST_KEEP = ["image_id", "path", "label", "label_index", "split", "status"]

REDUCED_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("features_pca", pa.list_(pa.float32())),
    ]
)
_IDS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("shard", pa.string()), ("shard_idx", pa.int32()), ("row", pa.int32()),
        ("kind", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ]
)
_ROW_SPAN = 1 << 31
"""(shard_idx, row) packs into shard_idx * _ROW_SPAN + row (rows are int32)."""
_IDS_DDL = "image_id string, shard string, shard_idx int, row int, kind string, reason string, detail string"


# ----------------------------------------------------------------------------------------------
# Reading shards on executors


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


def _shard_order(markers: dict[str, dict[str, Any]]) -> list[str]:
    """The shard stems in the order that numbers them: ``shard_idx`` i is ``_shard_order(markers)[i]``."""
    return sorted(markers)


def _stems_df(spark: Any, stems: list[str], num_partitions: int) -> Any:
    rows = [(s, i) for i, s in enumerate(stems)]
    n = max(1, min(len(rows), num_partitions))
    return spark.sparkContext.parallelize(rows, n).toDF("shard string, shard_idx int")


def _ids_task(folder: str, markers: dict[str, dict[str, Any]],
              checksums: bool) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
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


def features_dataframe(spark: Any, features: str, verify: bool = True, num_partitions: int | None = None) -> Any:
    """All committed feature shards of ``features`` as a DataFrame ``(image_id, shard, row, features array<float>)``.

    Each task verifies and reads its own shards through fsspec. Meant for interoperability (Spark ML);
    the pca stage itself keeps features out of the JVM.
    """
    markers = _markers(features)
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


def _markers(features: str) -> dict[str, dict[str, Any]]:
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


# ----------------------------------------------------------------------------------------------
# Per-shard row groups on executors


def _shard_groups(
    batches: Iterator[pa.RecordBatch], folder: str, stems: list[str], markers: dict[str, dict[str, Any]]
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Group incoming rows (sorted by ``shard_idx``, row; ``stems[shard_idx]`` names the shard) by shard;
    yield (rows, their features [m, d])."""
    pending: list[pa.RecordBatch] = []
    current: int | None = None

    def flush() -> tuple[pa.Table, np.ndarray]:
        table = pa.Table.from_batches(pending)
        stem = stems[current]
        marker = markers[stem]
        shards.verify_shard(folder, stem, marker, checksums=False)
        ids, feats = read_feature_shard(folder, stem, marker)
        rows = table.column("row").to_numpy()
        expect = np.asarray(table.column("image_id").to_pylist(), dtype=ID_DTYPE)
        if not np.array_equal(ids[rows], expect):
            raise shards.ShardVerificationError(f"{storage.join(folder, stem)}: ids changed since they were read")
        return table, feats[rows]

    for batch in batches:
        if batch.num_rows == 0:
            continue
        idx = batch.column(batch.schema.get_field_index("shard_idx")).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(idx)) + 1).tolist(), len(idx)]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            shard = int(idx[start])
            if current is not None and shard != current:
                yield flush()
                pending = []
            current = shard
            pending.append(batch.slice(start, stop - start))
    if pending:
        yield flush()


def _task_threads() -> Any:
    """Limit BLAS threads to the task's cores (Spark runs one task per core; more threads oversubscribe)."""
    from pyspark import TaskContext
    from threadpoolctl import threadpool_limits

    ctx = TaskContext.get()
    cpus = ctx.cpus() if ctx is not None else 1
    return threadpool_limits(limits=max(1, int(cpus)), user_api="blas")


def _reduce_rows(df: Any, folder: str, markers: dict[str, dict[str, Any]], make: Callable[[], Any],
                 finish: Callable[[Any], Any], merge: Callable[[Any, Any], Any], scratch: str) -> Any:
    """Fold every row's features into one accumulator per task; merge them one by one on the driver.

    Each task writes its settled accumulator (a d x d float64 triangle for the exact method) to a
    file of its own under ``scratch`` (any fsspec URL the driver can read) and returns only the
    name: sending 17 MB blobs through Spark's rows costs several CPU seconds of Arrow and pickle
    copies per task, a file costs one write and one read. Only files named by successful task
    attempts are read; the driver holds one accumulator and one file at a time.
    """

    stems = _shard_order(markers)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        acc = make()
        with _task_threads():
            for _, x in _shard_groups(batches, folder, stems, markers):
                finite = np.isfinite(x).all(axis=1)
                acc.add(x if finite.all() else x[finite])  # a NaN/inf row is left out, never fails the fit
        ctx = TaskContext.get()
        name = f"part-{ctx.partitionId() if ctx else 0:05d}-{ctx.attemptNumber() if ctx else 0}-{uuid.uuid4().hex[:8]}.npz"
        with fsspec.open(storage.join(scratch, name), "wb") as fh:
            fh.write(dump_accumulator(finish(acc)))
        yield pa.RecordBatch.from_arrays([pa.array([name], pa.string())], names=["file"])

    names = [r[0] for r in df.mapInArrow(run, "file string").collect()]
    total = finish(make())
    fs = fsspec.core.url_to_fs(scratch)[0]
    for name in names:
        path = fsspec.core.url_to_fs(storage.join(scratch, name))[1]
        with fs.open(path, "rb") as fh:
            total = merge(total, load_accumulator(fh.read()))
        fs.rm(path)
    return total


def _scratch(out: str) -> str:
    """A fresh folder for the fit's per-task accumulators (removed by :func:`_drop_scratch`)."""
    return storage.join(out, f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}")


def _drop_scratch(out: str) -> None:
    """Remove every scratch folder under ``out`` (this run's and those of killed runs)."""
    fs, root = fsspec.core.url_to_fs(out)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(SCRATCH_PREFIX):
            fs.rm(entry, recursive=True)


def _project_task(folder: str, markers: dict[str, dict[str, Any]], model: PcaModel,
                  nonfinite: Any = None) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The writing tasks' transform: rows -> reduced rows. A row whose features hold NaN or inf is left out
    and counted in the Spark accumulator ``nonfinite``."""
    # ((x - mean) / scale) @ C.T as (x - mean) @ (C.T / scale[:, None]): one pass less over each shard
    mean, proj = model.mean, np.ascontiguousarray(model.components.T / model.scale[:, None])
    stems = _shard_order(markers)
    k = proj.shape[1]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with _task_threads():
            yield from project(batches)

    def project(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table, x in _shard_groups(batches, folder, stems, markers):
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                if nonfinite is not None:
                    nonfinite.add(int((~finite).sum()))
                table, x = table.filter(pa.array(finite)), x[finite]
            z = (np.subtract(x, mean, dtype=np.float64) @ proj).astype(np.float32)  # one float64 pass over x
            m = z.shape[0]
            lists = pa.ListArray.from_arrays(pa.array(np.arange(0, m * k + 1, k, dtype=np.int32)), pa.array(z.reshape(-1)))
            cols = [table.column(n).combine_chunks() for n in ("image_id", "path", "label", "label_index", "split")]
            batch = pa.RecordBatch.from_arrays([*cols, lists], names=REDUCED_SCHEMA.names)
            yield conform_batch(batch, REDUCED_SCHEMA)

    return run


# ----------------------------------------------------------------------------------------------
# The stage


def _read_manifest_df(spark: Any, manifest: str) -> Any:
    from imgfeat.metadata.contracts.schema import read_summary

    read_summary(manifest)  # a clear error when OUT holds no manifest
    return read_parquet_dataset(spark, manifest_path(manifest), columns=MANIFEST_KEEP)


def _ids_pass(spark: Any, features: str, markers: dict[str, dict[str, Any]], partitions: int) -> tuple[Any, int]:
    """The persisted ids DataFrame and its number of reject rows; raises naming every refused shard."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    stems = _shard_order(markers)
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


def _join(ids: Any, man: Any | None, allow_extra: bool, rejects: int = 1) -> tuple[Any, dict[str, Any], Any]:
    """Full outer join of feature ids with the manifest: (matched rows, accounting, the persisted join).

    Ids present in several feature rows keep their first copy (lowest shard, row); the others are
    counted, and refused unless ``allow_extra``. All counts come from one aggregation job.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    # (shard_idx, row) packed into one long: a fixed-width minimum keeps this a (codegen) hash aggregate,
    # where a struct with a string made Spark sort every row twice.
    feats = (ids.filter("kind = 'feature'").groupBy("image_id")
             .agg(F.count(F.lit(1)).alias("_copies"),
                  F.min(F.col("shard_idx").cast("long") * F.lit(_ROW_SPAN) + F.col("row")).alias("_first"))
             .select("image_id", "_copies", (F.col("_first") / F.lit(_ROW_SPAN)).cast("int").alias("shard_idx"),
                     (F.col("_first") % F.lit(_ROW_SPAN)).cast("int").alias("row")))
    if man is None:
        m = None
        full = feats.select("*", F.lit(True).alias("_in_manifest"), F.lit("ok").alias("status"),
                            *(F.lit(None).cast(t).alias(c) for c, t in
                              (("path", "string"), ("label", "string"), ("label_index", "int"), ("split", "string"),
                               ("reject_reason", "string"))))
    else:
        m = man.select("image_id", "path", "label", "label_index", "split", "status", F.lit(True).alias("_in_manifest"))
        full = feats.join(m, "image_id", "full_outer")
        if rejects:  # the featurize reasons of manifest rows without features (a shuffle saved when there are none)
            rej = (ids.filter("kind = 'reject' AND image_id IS NOT NULL")
                   .groupBy("image_id").agg(F.min("reason").alias("reject_reason")))
            full = full.join(rej, "image_id", "left_outer")
        else:
            full = full.withColumn("reject_reason", F.lit(None).cast("string"))
    category = (F.when(F.col("_in_manifest").isNull(), F.lit("extra"))
                .when(F.col("shard_idx").isNull(), F.lit("missing")).otherwise(F.lit("matched")))
    reason = (F.when(F.col("status") != "ok", F.concat(F.lit("manifest:"), F.col("status")))
              .when(F.col("reject_reason").isNotNull(), F.concat(F.lit("featurize:"), F.col("reject_reason")))
              .otherwise(F.lit("not_featurized")))
    full = full.withColumn("_category", category).withColumn(
        "_reason", F.when(F.col("_category") == "missing", reason)).persist(StorageLevel.MEMORY_AND_DISK)
    counts = (full.groupBy("_category", "_reason", "split", (F.col("status") == "ok").alias("_ok"))
              .agg(F.count(F.lit(1)).alias("n"), F.sum(F.coalesce(F.col("_copies"), F.lit(1)) - 1).alias("dups"),
                   F.sum((F.col("_copies") > 1).cast("int")).alias("dup_ids"))
              .collect())
    acc: dict[str, Any] = {"manifest_rows": 0, "with_features": 0, "without_features": 0, "without_features_by_reason": {},
                           "extra_feature_rows": 0, "duplicate_feature_rows": 0, "duplicate_ids": 0, "matched_not_ok": 0,
                           "by_split": {}}
    for r in counts:
        cat, n = r["_category"], int(r["n"])
        acc["duplicate_feature_rows"] += int(r["dups"] or 0)
        acc["duplicate_ids"] += int(r["dup_ids"] or 0)
        if cat == "extra":
            acc["extra_feature_rows"] += n
            continue
        acc["manifest_rows"] += n
        if cat == "matched":
            acc["with_features"] += n
            split = r["split"] if r["split"] is not None else ""
            acc["by_split"][split] = acc["by_split"].get(split, 0) + n
            if r["_ok"] is False:
                acc["matched_not_ok"] += n
        else:
            acc["without_features"] += n
            reasons = acc["without_features_by_reason"]
            reasons[r["_reason"]] = reasons.get(r["_reason"], 0) + n
    acc["feature_rows"] = acc["with_features"] + acc["extra_feature_rows"] + acc["duplicate_feature_rows"]
    if man is None:
        for key in ("manifest_rows", "without_features", "without_features_by_reason", "extra_feature_rows",
                    "matched_not_ok", "by_split"):
            acc.pop(key)
    problems = []
    if acc["duplicate_feature_rows"]:
        shards_hit = sorted(r[0] for r in ids.filter("kind = 'feature'").groupBy("image_id", "shard").count()
                            .join(full.filter("_copies > 1").select("image_id"), "image_id")
                            .select("shard").distinct().limit(10).collect())
        problems.append(f"{acc['duplicate_ids']} image id(s) appear in more than one feature row "
                        f"({acc['duplicate_feature_rows']} extra row(s), shards {', '.join(shards_hit)})")
    if acc.get("extra_feature_rows"):
        examples = [r[0] for r in full.filter("_category = 'extra'").select("image_id").limit(5).collect()]
        acc["extra_examples"] = examples
        problems.append(f"{acc['extra_feature_rows']} feature row(s) have no manifest row (e.g. {', '.join(examples)})")
    if problems:
        if not allow_extra:
            full.unpersist()
            raise ValueError("--features: " + "; ".join(problems) + "; pass --allow-extra (pca.allow_extra) to count "
                             "them and keep only the first copy of each manifest row")
        log.warning("%s; counted and dropped (allow_extra)", "; ".join(problems))
    matched = full.filter("_category = 'matched'").select("image_id", "shard_idx", "row", "path", "label",
                                                          "label_index", "split")
    return matched, acc, full


def _common_shift(folder: str, markers: dict[str, dict[str, Any]], dim: int, rows: int = 1024) -> np.ndarray:
    """The mean of the first ``rows`` feature rows of the first non-empty shard (read by the driver: [rows, d] at most).

    Every fit task accumulates its sums around this one shift, so the driver merges them by plain
    addition. Any vector near the data's mean keeps the float64 sums free of cancellation.
    """
    for stem in sorted(markers):
        if int(markers[stem]["rows"]) > 0:
            head = np.asarray(read_feature_head(folder, stem, markers[stem], rows), dtype=np.float64)
            head = head[np.isfinite(head).all(axis=1)]  # the fit leaves NaN/inf rows out; so does the shift
            if head.shape[0]:
                return head.mean(axis=0)
    return np.zeros(dim)


def _unsettled(acc: Moments) -> Moments:
    return acc


def _fit(fit_rows: Any, folder: str, markers: dict[str, dict[str, Any]], cfg: Config, dim: int, method: str,
         scratch: str) -> PcaModel:
    pc = cfg.pca
    if method == "auto":
        method = "randomized" if dim > WIDE_DIM else "exact"
    if method == "exact":
        t = time.perf_counter()
        shift = _common_shift(folder, markers, dim)
        mom = _reduce_rows(fit_rows, folder, markers, lambda: Moments.with_shift(shift, full=True), _unsettled,
                           merge_moments, scratch).settle()
        if mom.n == 0:
            raise ValueError(f"pca.fit_split = {pc.fit_split!r}: no matched rows in that split")
        t_moments = time.perf_counter() - t
        t = time.perf_counter()
        model = fit_exact(mom, pc.k, pc.variance, pc.standardize)
        model.info.update(moments_s=round(t_moments, 3), eigh_s=round(time.perf_counter() - t, 3))
        return model
    if method != "randomized":
        raise ValueError(f"method must be auto, exact or randomized, got {method!r}")
    shift = _common_shift(folder, markers, dim)
    diag = _reduce_rows(fit_rows, folder, markers, lambda: Moments.with_shift(shift, full=False), _unsettled,
                        merge_moments, scratch).settle()
    if diag.n == 0:
        raise ValueError(f"pca.fit_split = {pc.fit_split!r}: no matched rows in that split")

    def product(mean: np.ndarray, scale: np.ndarray, q: np.ndarray) -> CovProduct:
        return _reduce_rows(fit_rows, folder, markers, lambda: CovProduct(mean, scale, q), lambda a: a.light(), merge_products,
                            scratch)

    return fit_randomized(diag, product, pc.k, pc.variance, pc.standardize)


def _write_json(url: str, payload: dict[str, Any]) -> None:
    storage.write_bytes_atomic(url, (json.dumps(payload, indent=1, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def _scatter_sample(spark: Any, reduced: str, rows: int) -> tuple[np.ndarray, list[str | None]]:
    from pyspark.sql import functions as F

    df = read_parquet_dataset(spark, reduced, columns=["label", "features_pca"])
    df = df.select("label", F.element_at("features_pca", 1).alias("c1"),
                   F.element_at("features_pca", 2).alias("c2"))
    if rows > SCATTER_POINTS:
        df = df.sample(fraction=min(1.0, 1.2 * SCATTER_POINTS / rows), seed=7).limit(SCATTER_POINTS)
    got = df.collect()
    pts = np.array([[r["c1"], r["c2"] if r["c2"] is not None else 0.0] for r in got], dtype=np.float64).reshape(-1, 2)
    return pts, [r["label"] for r in got]


def _partitions(spark: Any, cfg: Config, n_shards: int) -> int:
    # Feature shards are equal-sized, so one task per core balances; each Python task costs about 0.1 s of
    # fixed overhead in local mode (measured), which more tasks would multiply. spark.partitions overrides.
    return max(1, min(n_shards, cfg.spark.partitions or spark.sparkContext.defaultParallelism))


def _project_and_write(matched: Any, folder: str, markers: dict[str, dict[str, Any]], model: PcaModel, out: str,
                       expect_rows: int) -> dict[str, Any]:
    """Project and write ``OUT/reduced/``: into a scratch folder first, moved into place only when complete,
    so a failed run leaves the previous output as it was."""
    url = storage.join(out, REDUCED_DIR)
    staging = _scratch(out)
    # The writing tasks project their rows themselves: the projected rows never pass through the JVM.
    nonfinite = matched.sparkSession.sparkContext.accumulator(0)
    written = write_parquet_dataset(matched, staging, REDUCED_SCHEMA,
                                    transform=_project_task(folder, markers, model, nonfinite))
    left_out = expect_rows - written["rows"]
    # Retried tasks may count their non-finite rows twice, never less: more rows missing than that is a loss.
    if left_out < 0 or left_out > nonfinite.value:
        raise RuntimeError(f"{url}: wrote {written['rows']} rows but {expect_rows} were matched")
    if left_out:
        log.warning("pca: %d rows with NaN or inf features left out of the fit and %s", left_out, url)
    storage.publish_folder(staging, url)
    return {**written, "url": url, "nonfinite_rows": left_out}


def run_pca(cfg: Config, manifest: str, features: str, out: str, master: str | None = None, *,
            spark: Any = None, method: str = "auto", plots: bool = True) -> dict[str, Any]:
    """The ``imgfeat pca`` stage; returns the summary written to ``OUT/pca_summary.json``.

    ``method``: ``exact`` (d x d moments + eigh), ``randomized`` (subspace iteration, for wide data)
    or ``auto`` (randomized above :data:`WIDE_DIM` columns).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    cfg.validate()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if spark is None:
        from imgfeat.metadata.spark.session import get_spark

        spark = get_spark(cfg.spark, master)
    markers = _markers(features)
    dim = int(next(iter(markers.values()))["dim"])
    parts = _partitions(spark, cfg, len(markers))
    _drop_scratch(out)  # left by a killed run
    cached: list[Any] = []
    try:
        ids, rejects = _ids_pass(spark, features, markers, parts)
        cached.append(ids)
        timings["read_verify_ids"] = time.perf_counter() - t0
        t = time.perf_counter()
        man = _read_manifest_df(spark, manifest)
        matched, acc, joined = _join(ids, man, cfg.pca.allow_extra, rejects)
        cached.append(joined)
        if acc["with_features"] == 0:
            raise ValueError(f"--manifest {manifest} and --features {features} share no image_id")
        # Cached: the fit and the projection both read these rows, grouped by shard and sorted by row.
        matched = (matched.repartitionByRange(parts, "shard_idx").sortWithinPartitions("shard_idx", "row")
                   .persist(StorageLevel.MEMORY_AND_DISK))
        cached.append(matched)
        timings["join"] = time.perf_counter() - t
        t = time.perf_counter()
        fit_rows = matched.filter(F.col("split") == cfg.pca.fit_split) if cfg.pca.fit_split else matched
        # One fit task per core: each task writes one d x d file for the driver to add.
        fit_rows = fit_rows.select("image_id", "shard_idx", "row").coalesce(spark.sparkContext.defaultParallelism)
        model = _fit(fit_rows, features, markers, cfg, dim, method, _scratch(out))
        timings["fit"] = time.perf_counter() - t
        log.info("PCA %s: %d fit rows, d = %d, k = %d, explained variance %.4f (%.1f s)", model.method, model.n_fit, dim,
                 model.k, float(model.explained_variance_ratio.sum()), timings["fit"])
        t = time.perf_counter()
        written = _project_and_write(matched, features, markers, model, out, acc["with_features"])
        reduced_url = written["url"]
        timings["transform_write"] = time.perf_counter() - t
    finally:
        _drop_scratch(out)
        for df in cached:
            df.unpersist()
    model.save(storage.join(out, MODEL_FILE))
    storage.write_bytes_atomic(storage.join(out, CONFIG_FILE), dump_toml(cfg).encode())
    plot_files: list[str] = []
    if plots:
        t = time.perf_counter()
        plot_files = _plots(spark, model, reduced_url, out, written["rows"])
        timings["plots"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary = {
        "manifest": manifest, "features": features, "out": out, "reduced": reduced_url,
        "shards": len(markers), "dim": dim, "method": model.method, "k": model.k,
        "standardize": model.standardize, "fit_split": cfg.pca.fit_split, "fit_rows": model.n_fit,
        "explained_variance_ratio": model.explained_variance_ratio.tolist(),
        "explained_variance_ratio_total": float(model.explained_variance_ratio.sum()),
        "explained_variance": model.explained_variance.tolist(), "total_variance": model.total_variance,
        "rows": acc, "output_rows": written["rows"], "output_files": len(written["files"]),
        "nonfinite_feature_rows": written["nonfinite_rows"],
        "model": storage.join(out, MODEL_FILE), "plots": plot_files, "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "fingerprint": cfg.fingerprint("pca"), "config_fingerprint": cfg.fingerprint(), "partitions": parts,
        "model_info": model.info,
    }
    _write_json(storage.join(out, PCA_SUMMARY), summary)
    log.info("pca: %d rows -> %s (%d without features, %d extra) in %.1f s", written["rows"], reduced_url,
             acc["without_features"] if "without_features" in acc else 0, acc.get("extra_feature_rows", 0), timings["total"])
    return summary


def _plots(spark: Any, model: PcaModel, reduced_url: str, out: str, rows: int) -> list[str]:
    try:
        from imgfeat.metadata.pca.plots import save_scatter, save_variance
    except ImportError as exc:  # matplotlib is an optional extra
        log.warning("plots skipped: %s", exc)
        return []
    files = [storage.join(out, VARIANCE_PLOT)]
    save_variance(model.spectrum_ratio, model.k, files[0])
    if model.k >= 1:
        pts, labels = _scatter_sample(spark, reduced_url, rows)
        files.append(storage.join(out, SCATTER_PLOT))
        save_scatter(pts, labels, files[1], title=f"PCA ({len(labels)} of {rows} rows)")
    return files


def apply_pca(model_path: str, features: str, out: str, spark: Any, *, manifest: str | None = None,
              allow_extra: bool = False, partitions: int | None = None) -> dict[str, Any]:
    """Project committed feature shards with a saved ``pca_model.npz``; writes ``OUT/reduced/``.

    Without ``manifest`` every feature row is projected (manifest columns left null); with it, rows
    are joined back as in :func:`run_pca`.
    """
    t0 = time.perf_counter()
    model = PcaModel.load(model_path)
    markers = _markers(features)
    dim = int(next(iter(markers.values()))["dim"])
    if dim != model.dim:
        raise ValueError(f"--apply {model_path}: the model expects {model.dim} features, the shards have {dim}")
    parts = max(1, min(len(markers), partitions or spark.sparkContext.defaultParallelism))
    ids, rejects = _ids_pass(spark, features, markers, parts)
    man = _read_manifest_df(spark, manifest) if manifest else None
    matched, acc, joined = _join(ids, man, allow_extra, rejects)
    matched = matched.repartitionByRange(parts, "shard_idx").sortWithinPartitions("shard_idx", "row")
    try:
        written = _project_and_write(matched, features, markers, model, out, acc["with_features"])
    finally:
        _drop_scratch(out)
        joined.unpersist()
        ids.unpersist()
    reduced_url = written["url"]
    summary = {"model": model_path, "features": features, "manifest": manifest, "out": out, "reduced": reduced_url,
               "k": model.k, "dim": dim, "shards": len(markers), "rows": acc, "output_rows": written["rows"],
               "timings_s": {"total": round(time.perf_counter() - t0, 3)}}
    _write_json(storage.join(out, APPLY_SUMMARY), summary)
    return summary
