"""The pca stage's orchestration: feature shards + manifest -> ``RED/reduced/`` Parquet, model, summary, plots.

:func:`run_pca` runs the stage and :func:`apply_pca` projects new shards with a saved model; both
only sequence the steps below and write the small files (model, resolved config, JSON summary).
Nothing row-sized ever reaches the driver:

1. *Ids pass* (:mod:`.shard_io`): a DataFrame of shard stems (one row per committed shard) is spread
   over tasks; each task verifies its shard against its marker (sizes and sha256), reads only the
   ids and the featurize rejects, and yields ``(image_id, shard, row)`` rows. A shard that fails
   verification becomes an error row; the driver raises :class:`ShardVerificationError` naming the files.
2. *Join* (:mod:`.accounting`): Spark joins those ids with the manifest (read by tasks through
   fsspec) on ``image_id`` (full outer) and counts matched rows, manifest rows without features (by
   reason), feature rows without a manifest row and ids present in several shards. Only small
   counts are collected.
3. *Fit* (:mod:`.reduce`): the matched rows, range-partitioned by shard (one partition per core:
   shards are equal-sized, and each Python task costs about 0.1 s of fixed overhead), sorted by row
   and cached (the projection reads them too), go for the fit split to ``mapInArrow`` tasks that
   open their shards through fsspec, pick the rows and fold them into float64 sums around one
   common shift (the mean of the first shard's first rows, read by the driver). Each task writes
   its sums (the upper blocks of a d x d matrix) to its own file in a scratch folder under OUT
   (:mod:`.scratch`) and returns the name; the driver adds them up one file at a time (plain
   addition: the shift is shared) and runs one ``eigh`` (:mod:`.fit`).
4. *Transform and write* (:mod:`.project`): the tasks that write the Parquet files
   (``write_parquet_dataset`` with a ``transform``) project their rows with the model themselves,
   into a scratch folder; only the complete dataset replaces ``RED/reduced/``
   (``storage.publish_folder``), so a failed run leaves the previous output as it was.
5. *Plots* (:mod:`.plots`): explained variance and a sampled scatter, when matplotlib is there.

The features themselves never pass through the JVM: at 2048 floats a row, Arrow <-> JVM row
conversion would cost more than the whole PCA (see FACTS: about 0.2 ms of CPU per row).
:func:`~imgfeat.metadata.pca.shard_io.features_dataframe` gives the features as a Spark DataFrame
for those who want one (the Spark ML baseline of ``bench/bench_pca.py`` uses it).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from imgfeat.metadata import storage
from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts.pca_files import APPLY_SUMMARY, MODEL_FILE, PCA_SUMMARY
from imgfeat.metadata.contracts.schema import CONFIG_FILE, read_summary
from imgfeat.metadata.pca.accounting import join_manifest, read_manifest_df
from imgfeat.metadata.pca.fit import PcaModel
from imgfeat.metadata.pca.plots import write_plots
from imgfeat.metadata.pca.project import write_reduced
from imgfeat.metadata.pca.reduce import fit_model
from imgfeat.metadata.pca.scratch import drop_scratch, new_scratch
from imgfeat.metadata.pca.shard_io import ids_pass, read_markers

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)



def _partitions(spark: SparkSession, cfg: Config, n_shards: int) -> int:
    """Tasks for the per-shard work: one per core, at most one per shard; ``spark.partitions`` overrides."""
    # Feature shards are equal-sized, so one task per core balances; each Python task costs about 0.1 s of
    # fixed overhead in local mode (measured), which more tasks would multiply.
    return max(1, min(n_shards, cfg.spark.partitions or spark.sparkContext.defaultParallelism))


def run_pca(cfg: Config, manifest: str, features: str, out: str, master: str | None = None, *,
            spark: SparkSession | None = None, method: str = "auto", plots: bool = True) -> dict[str, Any]:
    """The ``imgfeat pca`` stage; returns the summary written to ``OUT/pca_summary.json``.

    ``method``: ``exact`` (d x d moments + eigh), ``randomized`` (subspace iteration, for wide data)
    or ``auto`` (randomized above :data:`~imgfeat.metadata.pca.reduce.WIDE_DIM` columns).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    cfg.validate()
    if cfg.pca.table_format == "delta" and not storage.is_local(out):
        raise ValueError(f"pca.table_format = 'delta': --out {out} is not a local folder (Delta output is written "
                         "to local folders in this release)")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    markers = read_markers(features)  # before Spark starts: a wrong folder or k is told at once
    dim = int(next(iter(markers.values()))["dim"])
    if cfg.pca.variance <= 0 and cfg.pca.k > dim:
        raise ValueError(f"pca.k = {cfg.pca.k} exceeds the feature width {dim} of --features {features}")
    splits = read_summary(manifest).get("by_split") or {}
    if cfg.pca.fit_split and splits and cfg.pca.fit_split not in splits:
        raise ValueError(f"pca.fit_split = {cfg.pca.fit_split!r}: the manifest has no such split; its splits: "
                         f"{', '.join(sorted(splits))} (or \"\" to fit on every row)")
    if spark is None:
        from imgfeat.metadata.spark.session import get_spark

        spark = get_spark(cfg.spark, master)
    timings["spark_start"] = time.perf_counter() - t0
    t_read = time.perf_counter()
    parts = _partitions(spark, cfg, len(markers))
    drop_scratch(out)  # left by a killed run
    cached: list[DataFrame] = []
    try:
        ids, rejects = ids_pass(spark, features, markers, parts)
        cached.append(ids)
        timings["read_verify_ids"] = time.perf_counter() - t_read
        t = time.perf_counter()
        man = read_manifest_df(spark, manifest)
        matched, acc, joined = join_manifest(ids, man, cfg.pca.allow_extra, rejects)
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
        model = fit_model(fit_rows, features, markers, cfg, dim, method, new_scratch(out))
        timings["fit"] = time.perf_counter() - t
        log.info("PCA %s: %d fit rows, d = %d, k = %d, explained variance %.4f (%.1f s)", model.method, model.n_fit, dim,
                 model.k, float(model.explained_variance_ratio.sum()), timings["fit"])
        t = time.perf_counter()
        written = write_reduced(matched, features, markers, model, out, acc["with_features"], cfg.pca.table_format)
        reduced_url = written["url"]
        timings["transform_write"] = time.perf_counter() - t
    finally:
        drop_scratch(out)
        for df in cached:
            df.unpersist()
    model.save(storage.join(out, MODEL_FILE))
    storage.write_bytes_atomic(storage.join(out, CONFIG_FILE), dump_toml(cfg).encode())
    plot_files: list[str] = []
    if plots:
        t = time.perf_counter()
        plot_files = write_plots(spark, model, reduced_url, out, written["rows"])
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
    storage.write_json_atomic(storage.join(out, PCA_SUMMARY), summary)
    log.info("pca: %d rows -> %s (%d without features, %d extra) in %.1f s", written["rows"], reduced_url,
             acc["without_features"] if "without_features" in acc else 0, acc.get("extra_feature_rows", 0), timings["total"])
    return summary


def apply_pca(model_path: str, features: str, out: str, spark: SparkSession, *, manifest: str | None = None,
              allow_extra: bool = False, partitions: int | None = None) -> dict[str, Any]:
    """Project committed feature shards with a saved ``pca_model.npz``; writes ``OUT/reduced/``.

    Without ``manifest`` every feature row is projected (manifest columns left null); with it, rows
    are joined back as in :func:`run_pca`. Returns the summary written to ``OUT/pca_apply_summary.json``.
    """
    t0 = time.perf_counter()
    model = PcaModel.load(model_path)
    markers = read_markers(features)
    dim = int(next(iter(markers.values()))["dim"])
    if dim != model.dim:
        raise ValueError(f"--apply {model_path}: the model expects {model.dim} features, the shards have {dim}")
    parts = max(1, min(len(markers), partitions or spark.sparkContext.defaultParallelism))
    ids, rejects = ids_pass(spark, features, markers, parts)
    man = read_manifest_df(spark, manifest) if manifest else None
    matched, acc, joined = join_manifest(ids, man, allow_extra, rejects)
    matched = matched.repartitionByRange(parts, "shard_idx").sortWithinPartitions("shard_idx", "row")
    try:
        written = write_reduced(matched, features, markers, model, out, acc["with_features"])
    finally:
        drop_scratch(out)
        joined.unpersist()
        ids.unpersist()
    reduced_url = written["url"]
    summary = {"model": model_path, "features": features, "manifest": manifest, "out": out, "reduced": reduced_url,
               "k": model.k, "dim": dim, "shards": len(markers), "rows": acc, "output_rows": written["rows"],
               "timings_s": {"total": round(time.perf_counter() - t0, 3)}}
    storage.write_json_atomic(storage.join(out, APPLY_SUMMARY), summary)
    return summary
