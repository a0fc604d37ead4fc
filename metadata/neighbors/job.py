"""The neighbours stage's order of work: feature vectors -> ``NB/neighbors/`` (k nearest by cosine) + summary.

:func:`run_neighbors` only sequences Spark jobs and writes the small files. Nothing row-sized reaches
the driver except the codebook sample (at most ``sample_rows`` rows, and never more than 256 MiB):

1. *Read* (:func:`detect_source`, :func:`read_vectors`): FEAT is either a folder of committed feature
   shards (ids pass and shard reads on executors, :mod:`imgfeat.metadata.pca.shard_io`) or a pca output
   folder (its ``reduced/`` dataset, read by tasks: a Parquet folder, or a Delta table's current version,
   whose files come from the Delta log, never from the folder). Tasks L2-normalise the vectors; rows with
   NaN, inf or zero norm are counted and left out, and an id in more than one row is refused. The
   ``(vid, image_id, vec)`` rows are persisted on the executors.
2. *Codebook*: a seeded sample is collected and a spherical k-means (:func:`~.ivf.kmeans`) gives ``C``
   cells (default about sqrt(n), at most sample / 10 and 4096). Only the ``C x d`` centroids go back out
   (a broadcast).
3. *Assign*: each vector's primary cell (persisted); the driver collects one count per cell.
4. *Expand and shuffle*: each vector becomes a query of its ``nprobe`` nearest cells (more when those
   hold fewer than k + 1 vectors) and the base of its primary cell only, so each (query, base) pair is
   compared at most once and only the queries are replicated (``nprobe`` rows each), as in a classic IVF
   index. A cell with more than ``block_rows`` base vectors is split into blocks by a hash of the vid
   (queries go to every block of the cell). Rows are repartitioned by (cell, block) and sorted base
   first within their partitions.
5. *Search* (:func:`~.tasks.search_task`): a task holds one (cell, block)'s base rows (at most about
   ``block_rows x d`` float32), streams that unit's queries against them in product blocks of
   :func:`~.ivf.search` and emits each query's top k there.
6. *Merge*: a Spark window (``row_number`` over the query by cosine desc, neighbour vid asc) keeps each
   query's best k of all its units (vectors are numbered by a 64-bit ``vid`` in the search, see
   :mod:`.tasks`: the ids are joined back to these k rows only); written with ``write_parquet_dataset``
   into a staging folder and published as ``NB/neighbors/`` only when complete.
7. *Report* (:func:`report`): counts by Spark aggregation over the written dataset, and the pairs above
   ``min_cosine`` joined to the manifest (near duplicates, pairs across splits, pairs across labels); only
   counts and at most 10 examples each reach the driver.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from imgfeat.metadata import storage
from imgfeat.metadata.config import Config, NeighborsConfig
from imgfeat.metadata.contracts import delta
from imgfeat.metadata.contracts.feature_store import committed_shards
from imgfeat.metadata.contracts.pca_files import REDUCED_DIR
from imgfeat.metadata.contracts.schema import manifest_path, read_summary
from imgfeat.metadata.neighbors import ivf
from imgfeat.metadata.neighbors.files import (
    NEIGHBORS_DIR,
    NEIGHBORS_SCHEMA,
    NEIGHBORS_SUMMARY,
    REDUCED_VECTOR,
    STAGING_PREFIX,
)
from imgfeat.metadata.neighbors.tasks import (
    ASSIGNED_DDL,
    CANDIDATES_DDL,
    EXPANDED_DDL,
    VECTORS_DDL,
    assign_task,
    binary_to_vectors,
    expand_task,
    parquet_vectors_task,
    search_task,
    shard_vectors_task,
)
from imgfeat.metadata.pca.shard_io import Markers, ids_pass, read_markers
from imgfeat.metadata.spark.parquet import dataset_files, read_parquet_dataset, write_parquet_dataset
from imgfeat.metadata.storage import SUCCESS_FILE

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

NPROBE = ivf.NPROBE
EXAMPLES = 10
"""Example pairs kept in the summary per kind."""


@dataclass
class NeighborParams:
    """The stage's options (command-line flags of ``imgfeat neighbors``)."""

    k: int = 10
    min_cosine: float = 0.95
    cells: int = 0
    """0 = about sqrt(n), bounded (:func:`~.ivf.default_cells`)."""
    nprobe: int = NPROBE
    sample_rows: int = ivf.SAMPLE_ROWS
    block_rows: int = 0
    """0 = 128 MiB of float32 base vectors per block, at most 65,536 rows (:func:`~.ivf.default_block_rows`)."""
    kmeans_iters: int = 20
    seed: int = 0

    @classmethod
    def from_config(cls, c: NeighborsConfig) -> NeighborParams:
        """The options of the ``[neighbors]`` config section."""
        return cls(k=c.k, min_cosine=c.min_cosine, cells=c.cells, nprobe=c.nprobe, sample_rows=c.sample_rows,
                   block_rows=c.block_rows, seed=c.seed)

    def validate(self) -> NeighborParams:
        """Check ranges; ValueError naming the option."""
        for name, value, low in (("k", self.k, 1), ("cells", self.cells, 0), ("nprobe", self.nprobe, 1),
                                 ("sample-rows", self.sample_rows, 1), ("block-rows", self.block_rows, 0),
                                 ("kmeans-iters", self.kmeans_iters, 1), ("seed", self.seed, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"--min-cosine must be between -1 and 1, got {self.min_cosine}")
        if self.cells > ivf.MAX_CELLS:
            raise ValueError(f"--cells must be at most {ivf.MAX_CELLS}, got {self.cells}")
        return self


@dataclass
class Source:
    """What FEAT holds: committed feature shards, or a pca ``reduced/`` dataset (a Parquet folder or a Delta table)."""

    kind: str
    """``shards`` or ``reduced``."""
    url: str
    """The shard folder, or the reduced dataset's folder."""
    dim: int
    markers: Markers | None = None
    files: list[str] = field(default_factory=list)
    delta_version: int | None = None
    """The Delta table version read (its files only); None for a Parquet folder or shards."""


def detect_source(features: str) -> Source:
    """Decide by content what ``features`` is; ValueError naming the folder when it is neither kind."""
    storage.check_folder(features, "--features")
    if committed_shards(features, verify=False):
        markers = read_markers(features)
        return Source("shards", features, int(next(iter(markers.values()))["dim"]), markers=markers)
    for url in (storage.join(features, REDUCED_DIR), features):
        source = _reduced_source(url)
        if source is not None:
            return source
    raise ValueError(f"--features {features}: neither committed feature shards (part-*.done.json markers) nor a pca "
                     f"output folder ({REDUCED_DIR}/ with {SUCCESS_FILE} or a Delta log, and columns image_id, "
                     f"{REDUCED_VECTOR})")


def _reduced_source(url: str) -> Source | None:
    """``url`` as a reduced dataset: a committed Parquet folder, or a Delta table read at its current version
    (the folder also holds older versions' files: only the log says which are current); None when neither."""
    version = None
    if delta.is_delta(url):
        version = delta.table_version(url)
        files = delta.current_files(url, version)
    elif _exists(storage.join(url, SUCCESS_FILE)):
        files = dataset_files(url)
    else:
        return None
    dim = _reduced_dim(url, files)
    return None if dim is None else Source("reduced", url, dim, files=files, delta_version=version)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def _reduced_dim(url: str, files: list[str]) -> int | None:
    """The vector length of a reduced dataset (its first non-null row), None when it has no such columns."""
    for f in files:
        fs, path = fsspec.core.url_to_fs(f)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if "image_id" not in pf.schema_arrow.names or REDUCED_VECTOR not in pf.schema_arrow.names:
                return None
            for batch in pf.iter_batches(batch_size=256, columns=[REDUCED_VECTOR]):
                lengths = batch.column(0).value_lengths().drop_null()
                if len(lengths):
                    return int(lengths[0].as_py())
    raise ValueError(f"--features {url}: the reduced dataset holds no vectors")


def read_vectors(spark: SparkSession, source: Source, partitions: int) -> tuple[DataFrame, DataFrame | None]:
    """``(image_id, vec)`` rows of ``source`` read by tasks (vec: unit float32 bytes, null when unusable), and the
    persisted ids pass of a shard folder (for the caller to unpersist once the vectors are persisted)."""
    if source.kind == "shards":
        assert source.markers is not None
        markers = source.markers
        parts = max(1, min(len(markers), partitions))
        ids, _ = ids_pass(spark, source.url, markers, parts)
        # Each shard's rows in one task, in row order: the task reads the shard once (hash partitioning needs no
        # sampling job, as a range partitioning would).
        feat = (ids.filter("kind = 'feature'").select("image_id", "shard_idx", "row")
                .repartition(parts, "shard_idx").sortWithinPartitions("shard_idx", "row"))
        return feat.mapInArrow(shard_vectors_task(source.url, markers), VECTORS_DDL), ids
    n = max(1, min(len(source.files), partitions))
    frame = spark.sparkContext.parallelize(list(enumerate(source.files)), n).toDF("file_idx int, file string")
    return frame.mapInArrow(parquet_vectors_task(REDUCED_VECTOR, source.dim), VECTORS_DDL), None


def _sample(good: DataFrame, n: int, bound: int, seed: int, dim: int) -> np.ndarray:
    """At most ``bound`` unit vectors drawn with ``seed`` (the only rows the driver holds)."""
    df = good.select("vec")
    fraction = min(1.0, 1.2 * bound / max(n, 1))
    if fraction < 1.0:
        df = df.sample(False, fraction, seed=seed)
    table = df.limit(bound).toArrow()
    return binary_to_vectors(table.column("vec"), dim)


def _search_partitions(spark: SparkSession, cfg: Config, units: int) -> int:
    """Tasks of the search: two per core (units differ in cost; each Python task also costs about 0.1 s to start),
    at most one per unit; ``spark.partitions`` when it asks for more."""
    return max(1, min(units, max(2 * spark.sparkContext.defaultParallelism, cfg.spark.partitions)))


def _drop_staging(out: str) -> None:
    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(root):
        for entry in fs.ls(root, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1].startswith(STAGING_PREFIX):
                storage.remove_folder(fs.unstrip_protocol(entry))


def run_neighbors(cfg: Config, manifest: str, features: str, out: str, params: NeighborParams | None = None, *,
                  spark: SparkSession | None = None, master: str | None = None) -> dict[str, Any]:
    """The ``imgfeat neighbors`` stage; returns the summary written to ``NB/neighbors_summary.json``."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    params = (params or NeighborParams()).validate()
    cfg.validate()
    read_summary(manifest)  # a clear error before any Spark work when OUT holds no manifest
    source = detect_source(features)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if spark is None:
        from imgfeat.metadata.spark.session import get_spark

        spark = get_spark(cfg.spark, master)
    timings["spark_start"] = time.perf_counter() - t0
    parallel = cfg.spark.partitions or spark.sparkContext.defaultParallelism
    _drop_staging(out)
    cached: list[DataFrame] = []
    centroids_bc = None
    t = time.perf_counter()
    try:
        vectors, ids = read_vectors(spark, source, parallel)
        cached += [ids] if ids is not None else []
        vectors = vectors.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(vectors)
        stats = vectors.agg(F.count(F.lit(1)).alias("rows"), F.sum(F.col("vec").isNull().cast("long")).alias("bad"),
                            F.countDistinct("image_id").alias("distinct")).collect()[0]
        rows, bad = int(stats["rows"]), int(stats["bad"] or 0)
        if ids is not None:
            ids.unpersist()
        if int(stats["distinct"]) != rows:
            raise ValueError(f"--features {source.url}: {rows - int(stats['distinct'])} feature row(s) repeat an image id "
                             "of another row")
        n = rows - bad
        if bad:
            log.warning("neighbors: %d feature row(s) with NaN, inf or zero norm left out", bad)
        if n < 2:
            raise ValueError(f"--features {features}: {n} usable feature row(s); neighbours need at least 2")
        timings["read"] = time.perf_counter() - t

        t = time.perf_counter()
        good = vectors.filter(F.col("vec").isNotNull())
        bound = ivf.sample_bound(source.dim, params.sample_rows)
        sample = _sample(good, n, bound, params.seed, source.dim)
        cells = min(params.cells or ivf.default_cells(n, bound), sample.shape[0])
        centroids = ivf.kmeans(sample, cells, params.kmeans_iters, params.seed)
        cells = centroids.shape[0]
        sample_n = int(sample.shape[0])
        del sample
        timings["codebook"] = time.perf_counter() - t
        log.info("neighbors: %d vectors, d = %d, %d cells fitted on %d sample rows (%.1f s)", n, source.dim, cells,
                 sample_n, timings["codebook"])

        t = time.perf_counter()
        centroids_bc = spark.sparkContext.broadcast(centroids)
        assigned = good.mapInArrow(assign_task(centroids_bc, source.dim), ASSIGNED_DDL).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(assigned)
        base_counts = np.zeros(cells, dtype=np.int64)
        for r in assigned.groupBy("cell").count().collect():
            base_counts[int(r[0])] = int(r[1])
        vectors.unpersist()
        timings["assign"] = time.perf_counter() - t

        t = time.perf_counter()
        block_rows = params.block_rows or ivf.default_block_rows(source.dim)
        blocks = np.array([ivf.blocks_for(int(c), block_rows) for c in base_counts], dtype=np.int64)
        units = int(blocks.sum())
        expect = min(params.k, n - 1)
        parts = _search_partitions(spark, cfg, units)
        expanded = assigned.mapInArrow(
            expand_task(centroids_bc, source.dim, base_counts, blocks, params.nprobe, expect + 1), EXPANDED_DDL)
        ordered = expanded.repartition(parts, "cell", "block").sortWithinPartitions("cell", "block", F.desc("is_base"))
        candidates = ordered.mapInArrow(search_task(source.dim, params.k), CANDIDATES_DDL)
        best = Window.partitionBy("qvid").orderBy(F.desc("cosine"), F.asc("nvid"))
        ranked = candidates.withColumn("rank", F.row_number().over(best)).filter(F.col("rank") <= params.k)
        names = assigned.select("vid", "image_id")
        ranked = (ranked.join(names.withColumnRenamed("vid", "qvid"), "qvid")
                  .join(names.select(F.col("vid").alias("nvid"), F.col("image_id").alias("neighbor_id")), "nvid")
                  .select("image_id", "neighbor_id", "cosine", "rank"))
        url = storage.join(out, NEIGHBORS_DIR)
        staging = storage.join(out, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
        written = write_parquet_dataset(ranked, staging, NEIGHBORS_SCHEMA)
        storage.publish_folder(staging, url)
        timings["search_merge_write"] = time.perf_counter() - t
    finally:
        _drop_staging(out)
        for df in cached:
            df.unpersist()
        if centroids_bc is not None:
            centroids_bc.destroy()

    t = time.perf_counter()
    found = report(spark, url, manifest, params.min_cosine, expect, parallel)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    nonempty = base_counts[base_counts > 0]
    summary: dict[str, Any] = {
        "features": features, "source": source.kind, "source_url": source.url, "source_delta_version": source.delta_version,
        "manifest": manifest, "out": out,
        "neighbors": url, "dim": source.dim, "k": params.k, "min_cosine": params.min_cosine,
        "rows": {"feature_rows": rows, "unusable_rows": bad, "vectors": n},
        "output_rows": written["rows"], "output_files": len(written["files"]),
        "index": {"cells": cells, "nprobe": params.nprobe, "sample_rows": sample_n, "sample_bound": bound,
                  "kmeans_iters": params.kmeans_iters, "seed": params.seed, "block_rows": block_rows,
                  "split_cells": int((blocks > 1).sum()), "units": units, "empty_cells": int((base_counts == 0).sum()),
                  "cell_rows": {"min": int(nonempty.min()), "median": float(np.median(nonempty)), "max": int(nonempty.max())},
                  "search_partitions": parts},
        **found,
        "params": asdict(params),
        "timings_s": {key: round(v, 3) for key, v in timings.items()},
    }
    storage.write_json_atomic(storage.join(out, NEIGHBORS_SUMMARY), summary)
    log.info("neighbors: %d rows for %d vectors -> %s; %d pairs >= %.3f (%d across splits, %d across labels) in %.1f s",
             written["rows"], n, url, found["near_duplicates"]["pairs"], params.min_cosine, found["cross_split"]["pairs"],
             found["cross_label"]["pairs"], timings["total"])
    return summary


def _example(r: Any) -> dict[str, Any]:
    return {"image_id": r["a"], "neighbor_id": r["b"], "cosine": round(float(r["cosine"]), 6),
            "path": r["path_a"], "neighbor_path": r["path_b"], "split": r["split_a"], "neighbor_split": r["split_b"],
            "label": r["label_a"], "neighbor_label": r["label_b"]}


def report(spark: SparkSession, url: str, manifest: str, min_cosine: float, expect: int,
           partitions: int) -> dict[str, Any]:
    """Counts over the written neighbours at ``url`` and the pairs at or above ``min_cosine``, with the manifest.

    A pair is unordered and counted once (found from either side). Only pairs within an image's k
    nearest neighbours are seen: an image with more than k near duplicates shows k of them.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    nb = read_parquet_dataset(spark, url, num_partitions=partitions)
    per = nb.groupBy("image_id").agg(F.count(F.lit(1)).alias("n"), F.max("cosine").alias("top"))
    q = per.agg(F.count(F.lit(1)).alias("queries"), F.sum((F.col("n") < expect).cast("long")).alias("short"),
                F.avg("top").alias("mean"), F.percentile_approx("top", [0.01, 0.5, 0.99]).alias("pct")).collect()[0]
    pairs = (nb.filter(F.col("cosine") >= float(min_cosine))
             .select(F.least("image_id", "neighbor_id").alias("a"), F.greatest("image_id", "neighbor_id").alias("b"), "cosine")
             .groupBy("a", "b").agg(F.max("cosine").alias("cosine")))
    man = read_parquet_dataset(spark, manifest_path(manifest), columns=["image_id", "path", "label", "split"],
                               num_partitions=partitions)
    side = {s: man.select(F.col("image_id").alias(s), *(F.col(c).alias(f"{c}_{s}") for c in ("path", "label", "split")))
            for s in ("a", "b")}
    joined = pairs.join(side["a"], "a", "left").join(side["b"], "b", "left")
    known = F.col("path_a").isNotNull() & F.col("path_b").isNotNull()
    cross_split = known & F.col("split_a").isNotNull() & F.col("split_b").isNotNull() & (F.col("split_a") != F.col("split_b"))
    cross_label = known & F.col("label_a").isNotNull() & F.col("label_b").isNotNull() & (F.col("label_a") != F.col("label_b"))
    joined = joined.withColumn("_xs", cross_split).withColumn("_xl", cross_label).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        c = joined.agg(F.count(F.lit(1)).alias("pairs"), F.sum(F.col("_xs").cast("long")).alias("xs"),
                       F.sum(F.col("_xl").cast("long")).alias("xl"),
                       F.sum((~known).cast("long")).alias("unknown")).collect()[0]
        order = [F.desc("cosine"), F.asc("a"), F.asc("b")]

        picked = None
        for kind, cond in (("near_duplicates", F.lit(True)), ("cross_split", F.col("_xs")), ("cross_label", F.col("_xl"))):
            top = joined.filter(cond).orderBy(*order).limit(EXAMPLES).withColumn("_kind", F.lit(kind))
            picked = top if picked is None else picked.unionByName(top)
        assert picked is not None
        examples: dict[str, list[dict[str, Any]]] = {"near_duplicates": [], "cross_split": [], "cross_label": []}
        for r in sorted(picked.collect(), key=lambda r: (-r["cosine"], r["a"], r["b"])):  # one job for the three lists
            examples[r["_kind"]].append(_example(r))
        by_splits = {f"{r['s1']}|{r['s2']}": int(r["n"]) for r in joined.filter("_xs").groupBy(
            F.least("split_a", "split_b").alias("s1"), F.greatest("split_a", "split_b").alias("s2")).count()
            .withColumnRenamed("count", "n").collect()}
        label_pairs = [{"labels": [r["l1"], r["l2"]], "pairs": int(r["n"])} for r in joined.filter("_xl").groupBy(
            F.least("label_a", "label_b").alias("l1"), F.greatest("label_a", "label_b").alias("l2")).count()
            .withColumnRenamed("count", "n").orderBy(F.desc("n"), "l1", "l2").limit(EXAMPLES).collect()]
        result = {
            "queries": int(q["queries"]), "queries_short": int(q["short"] or 0), "expected_per_query": expect,
            "top1_cosine": {"mean": round(float(q["mean"] or 0.0), 6),
                            **{f"p{p}": round(float(v), 6) for p, v in zip((1, 50, 99), q["pct"] or [0.0, 0.0, 0.0])}},
            "near_duplicates": {"min_cosine": min_cosine, "pairs": int(c["pairs"]),
                                "pairs_without_manifest_row": int(c["unknown"] or 0),
                                "examples": examples["near_duplicates"]},
            "cross_split": {"pairs": int(c["xs"] or 0), "by_splits": by_splits, "examples": examples["cross_split"]},
            "cross_label": {"pairs": int(c["xl"] or 0), "label_pairs": label_pairs, "examples": examples["cross_label"]},
        }
    finally:
        joined.unpersist()
    return result
