"""Projecting the matched rows with the model and writing ``RED/reduced/``.

The tasks that write the Parquet files project their own rows (:func:`project_task`, the
``transform`` of ``write_parquet_dataset``): they read the rows' features from the shards, compute
``(x - mean) @ (components.T / scale)`` and write ``image_id, path, label, label_index, split,
features_pca`` (:data:`REDUCED_SCHEMA`), so projected rows never pass through the JVM.
:func:`write_reduced` writes into a scratch folder, checks that every matched row was written or
left out for NaN/inf features, and only then publishes the folder as ``RED/reduced/`` with
``storage.publish_folder``, so a failed run leaves the previous output as it was.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.contracts.pca_files import REDUCED_DIR
from imgfeat.metadata.pca.fit import PcaModel
from imgfeat.metadata.pca.scratch import new_scratch
from imgfeat.metadata.pca.shard_io import Markers, shard_groups, shard_order
from imgfeat.metadata.pca.threads import task_threads
from imgfeat.metadata.spark.parquet import conform_batch, write_parquet_dataset

if TYPE_CHECKING:
    from pyspark import Accumulator
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

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


def project_task(folder: str, markers: Markers, model: PcaModel,
                 nonfinite: Accumulator[int] | None = None) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The writing tasks' transform: rows -> reduced rows. A row whose features hold NaN or inf is left out
    and counted in the Spark accumulator ``nonfinite``."""
    # ((x - mean) / scale) @ C.T as (x - mean) @ (C.T / scale[:, None]): one pass less over each shard
    mean, proj = model.mean, np.ascontiguousarray(model.components.T / model.scale[:, None])
    stems = shard_order(markers)
    k = proj.shape[1]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with task_threads():
            yield from project(batches)

    def project(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table, x in shard_groups(batches, folder, stems, markers):
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


def write_reduced(matched: DataFrame, folder: str, markers: Markers, model: PcaModel, out: str,
                  expect_rows: int, table_format: str = "parquet") -> dict[str, Any]:
    """Project and write ``OUT/reduced/``: into a scratch folder first, moved into place only when complete,
    so a failed run leaves the previous output as it was (``table_format = "delta"``: committed as the next
    version of a Delta table there).

    ``matched`` holds the join's matched rows sorted by (shard_idx, row) within its partitions, and
    ``expect_rows`` their number. Returns ``{"url", "files", "rows", "nonfinite_rows"}``.
    """
    url = storage.join(out, REDUCED_DIR)
    staging = new_scratch(out)
    # The writing tasks project their rows themselves: the projected rows never pass through the JVM.
    nonfinite = matched.sparkSession.sparkContext.accumulator(0)
    written = write_parquet_dataset(matched, staging, REDUCED_SCHEMA,
                                    transform=project_task(folder, markers, model, nonfinite))
    left_out = expect_rows - written["rows"]
    # Retried tasks may count their non-finite rows twice, never less: more rows missing than that is a loss.
    if left_out < 0 or left_out > nonfinite.value:
        raise RuntimeError(f"{url}: wrote {written['rows']} rows but {expect_rows} were matched")
    if left_out:
        log.warning("pca: %d rows with NaN or inf features left out of the fit and %s", left_out, url)
    if table_format == "delta":
        from imgfeat.metadata.contracts import delta

        delta.publish_dataset(url, staging, REDUCED_SCHEMA, {"rows": written["rows"], "k": int(model.k)})
    else:
        storage.publish_folder(staging, url)
    return {**written, "url": url, "nonfinite_rows": left_out}
